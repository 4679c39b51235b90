"""Document sources: a grain MapDataset of token arrays (int32[n], no EOS) per config and split.

- "default" / "text_dir": pre-tokenized by `builder.DispersionCorpus`, cached in the TFDS data dir.
- "tfds": any ArrayRecord TFDS dataset the user prepared; its text feature is tokenized on the fly.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dispersion_jax import tokenizer as tokenizer_lib
from dispersion_jax.data import builder as builder_lib

SOURCES = ("default", "text_dir", "tfds")


def _check_source(cfg: ml_collections.ConfigDict) -> str:
  source = cfg.data.source
  if source not in SOURCES:
    raise ValueError(f"Unknown data.source {source!r}; set --config.data.source to one of {SOURCES}.")
  return source


def _tfds_split(cfg: ml_collections.ConfigDict, split: str) -> str:
  # "validation" is an alias for the configured held-out split (e.g. "test" for some datasets).
  if split == "validation" and cfg.data.source == "tfds":
    return cfg.data.validation_split
  return split


def corpus_builder(cfg: ml_collections.ConfigDict) -> builder_lib.DispersionCorpus:
  """The (prepared, cached) builder of the "default" or "text_dir" source."""
  return builder_lib.prepare(
      builder_lib.get_builder(cfg.data.source, cfg.data.text_dir, cfg.tokenizer, cfg.data.data_dir)
  )


def _tfds_source(cfg: ml_collections.ConfigDict, split: str):
  name, data_dir = cfg.data.tfds_name, cfg.data.data_dir
  fix = (
      f"run `tfds build {name} --file_format=array_record"
      f"{' --data_dir=' + data_dir if data_dir else ''}` or set --config.data.data_dir"
  )
  if not name:
    raise ValueError(
        "data.source='tfds' needs a dataset; set --config.data.tfds_name (e.g. wikitext/wikitext-103-raw-v1)."
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types (DatasetNotFoundError, ValueError, ...).
    where = data_dir or "(TFDS default)"
    raise ValueError(f"TFDS dataset {name!r} not found in data dir {where} ({type(e).__name__}); {fix}.") from None
  if not builder.is_prepared():
    raise ValueError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; {fix}.")
  if split not in builder.info.splits:
    has = list(builder.info.splits)
    raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (has {has}); set --config.data.validation_split.")
  try:
    return builder.as_data_source(split)
  except (NotImplementedError, ValueError) as e:
    raise ValueError(f"TFDS dataset {name!r} cannot be read without TensorFlow ({e}); {fix}.") from None


class _TokenizeText(grain.transforms.Map):
  """Tokenizes the `text_key` feature of a TFDS example (bytes or str) to int32[n]."""

  def __init__(self, tokenizer_name: str, text_key: str):
    self._tokenizer_name, self._text_key = tokenizer_name, text_key

  def map(self, example) -> np.ndarray:
    text = example[self._text_key]
    if isinstance(text, (bytes, np.bytes_)):
      text = text.decode("utf-8", errors="replace")
    # Cached per process: cheap after the first call, and picklable for grain workers.
    tok = tokenizer_lib.get_tokenizer(self._tokenizer_name)
    return np.asarray(tok.encode(str(text)), dtype=np.int32)


def _tokens(example) -> np.ndarray:
  return example["tokens"]


def documents(cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """MapDataset of int32[n] token arrays, one per document, in stored order."""
  source = _check_source(cfg)
  if source == "tfds":
    ds = grain.MapDataset.source(_tfds_source(cfg, _tfds_split(cfg, split)))
    return ds.map(_TokenizeText(cfg.tokenizer, cfg.data.text_key))
  builder = corpus_builder(cfg)
  if split not in builder.info.splits:
    raise ValueError(f"Split {split!r} does not exist for data.source={source!r}; use train or validation.")
  return grain.MapDataset.source(builder.as_data_source(split)).map(_tokens)


def eos_id(cfg: ml_collections.ConfigDict) -> int:
  return tokenizer_lib.get_tokenizer(cfg.tokenizer).eos_id


def build_dataset(cfg: ml_collections.ConfigDict) -> None:
  """Prepares and caches the configured source (idempotent); for "tfds" checks it is prepared."""
  if _check_source(cfg) == "tfds":
    for split in ("train", "validation"):
      _tfds_source(cfg, _tfds_split(cfg, split))
  else:
    corpus_builder(cfg)
