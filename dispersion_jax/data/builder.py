"""TFDS builder writing pre-tokenized documents to ArrayRecord (read back without TensorFlow).

Each example is one document: `tokens` int32[n] (tokenizer ids, NO EOS appended; the pipeline
appends the EOS separator when packing) and `doc_id`. Splits are decided by a hash of doc_id
(~2% validation, at least one doc in each), so they are stable however the corpus is ordered.
The config name carries the source and the tokenizer identity, so caches never mix:
`default-gpt2`, `default-hf-<hash>`, `textdir-<dir fingerprint>-gpt2`, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dispersion_jax import tokenizer as tokenizer_lib
from dispersion_jax.data import corpus

VALIDATION_FRACTION = 0.02
_ENCODE_CHUNK = 512  # Documents per encode_batch call.


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  source: str = "default"  # "default" | "text_dir"
  text_dir: str = ""
  tokenizer: str = "gpt2"  # "gpt2" or HF tokenizer dir.


def _doc_hash(doc_id: str) -> float:
  return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


class DispersionCorpus(tfds.core.GeneratorBasedBuilder):
  """Pre-tokenized documents of the default corpus or a user text dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Pre-tokenized documents, no EOS, hash split."}
  BUILDER_CONFIGS = [CorpusConfig(name="default-gpt2", description="KJV + BBC News, GPT-2 BPE.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "doc_id": tfds.features.Text(),
            # BYTES: raw int32 on disk, decoded with np.frombuffer (NONE would upcast to int64 protos).
            "tokens": tfds.features.Tensor(
                shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
            ),
        }),
        description="Documents tokenized once at build time; EOS is added by the input pipeline.",
    )

  def _docs(self) -> Iterator[corpus.Doc]:
    cfg: CorpusConfig = self.builder_config
    docs = corpus.default_docs() if cfg.source == "default" else corpus.text_dir_docs(cfg.text_dir)
    return ((i, t) for i, t in docs if t.strip())

  def _validation_ids(self) -> frozenset[str]:
    """~2% of doc ids by hash; forced to leave at least one document in each split."""
    hashes = {doc_id: _doc_hash(doc_id) for doc_id, _ in self._docs()}
    if len(hashes) < 2:
      name, n = self.builder_config.name, len(hashes)
      raise ValueError(f"Corpus {name} has {n} non-empty document(s); add documents (need >= 2).")
    val = {d for d, h in hashes.items() if h < VALIDATION_FRACTION}
    if not val:
      val = {min(hashes, key=hashes.get)}
    if len(val) == len(hashes):
      val.discard(max(hashes, key=hashes.get))
    return frozenset(val)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing downloads.
    val_ids = self._validation_ids()
    return {
        "train": self._generate_examples(val_ids, want_validation=False),
        "validation": self._generate_examples(val_ids, want_validation=True),
    }

  def _generate_examples(self, val_ids: frozenset[str], want_validation: bool):
    tok = tokenizer_lib.get_tokenizer(self.builder_config.tokenizer)
    docs = ((i, t) for i, t in self._docs() if (i in val_ids) == want_validation)
    while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
      ids = tok.encode_batch([text for _, text in chunk])
      for (doc_id, _), tokens in zip(chunk, ids):
        yield doc_id, {"doc_id": doc_id, "tokens": np.asarray(tokens, dtype=np.int32)}


def corpus_config(source: str, text_dir: str, tokenizer: str) -> CorpusConfig:
  tok_name = tokenizer_lib.get_tokenizer(tokenizer).name  # Also validates the tokenizer path.
  if source == "default":
    return CorpusConfig(name=f"default-{tok_name}", source="default", tokenizer=tokenizer)
  if source == "text_dir":
    if not text_dir:
      raise ValueError("data.source='text_dir' needs a directory; set --config.data.text_dir=/path/to/texts.")
    root = str(pathlib.Path(text_dir).expanduser().resolve())
    name = f"textdir-{corpus.text_dir_fingerprint(root)}-{tok_name}"
    return CorpusConfig(name=name, source="text_dir", text_dir=root, tokenizer=tokenizer)
  raise ValueError(f"Unknown data.source {source!r} for the corpus builder; use 'default' or 'text_dir'.")


def get_builder(source: str, text_dir: str, tokenizer: str, data_dir: str | None) -> DispersionCorpus:
  """The builder for a source; `data_dir=None` is the TFDS default (~/tensorflow_datasets)."""
  config = corpus_config(source, text_dir, tokenizer)
  # TFDS refuses a custom config object named like a registered one: pass those by name.
  registered = config.name in DispersionCorpus.builder_configs
  return DispersionCorpus(
      config=config.name if registered else config, data_dir=data_dir, file_format="array_record"
  )


def prepare(builder: DispersionCorpus) -> DispersionCorpus:
  """Builds once; later calls find the finished dataset in data_dir and return at once."""
  if not builder.is_prepared():
    # Stats need TensorFlow; they are not used here.
    dl_config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(download_config=dl_config)
  return builder
