"""The pre-packed dataset: its cache location and fingerprint, its TFDS ArrayRecord format, and reading blocks.

Layout (`root` = data.cache_dir, else data.data_dir, else the TFDS default data dir; a local path or gs://):

  <root>/dispersion_packed/<label>-<tokenizer>-L<seq_len>-<fingerprint>/   a TFDS dataset (builder_from_directory)
      dataset_info.json, features.json                                    (tfds.folder_dataset.write_metadata)
      dispersion_packed-{train,validation}.array_record-0000k-of-0000n     (ArrayRecord, group_size:1)
      pack_meta.json                                                       (fingerprint, counts; see build.py)
  <root>/dispersion_packed/tokens/<label>-<tokenizer>-<token key>/        stage-A token files, kept for re-packing
                                                                           (key: input, tokenizer, work units)

Record i of a split = block i = tokens [i(L+1), (i+1)(L+1)) of the split's stream "doc0 EOS doc1 EOS ...":
  tokens      uint16[L+1] (uint32 when the vocabulary has more than 65,536 ids)
  doc_starts  int32[k]     positions j in [1, L] of the block where a document begins (for segment ids)
The last partial block of each split is dropped (counted in pack_meta.json). Reading needs no TensorFlow.

In a bucket (`root` = gs://...) a dataset is a prefix that `storage.transfer.publish` finished with its marker
object, uploaded last: a prefix without it (a killed upload) is not a dataset. The build stages the token files and
the shards on a local disk first (`data.staging_dir`), because ArrayRecord cannot write to gs://; training reads the
shards from the bucket directly (array_record >= 0.8.3), every host the same prefix.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shlex

import numpy as np

from dispersion_jax.data import inputs as inputs_lib
from dispersion_jax.data import token_files
from dispersion_jax.data import tokenizer as tokenizer_lib
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import DataError, DatasetNotBuiltError
from dispersion_jax.storage import paths, transfer

FORMAT_VERSION = 1  # bump when the records or their meaning change: a new fingerprint
DATASET_NAME = "dispersion_packed"
SPLITS = inputs_lib.SPLITS
SHARD_BYTES = 64 << 20  # token bytes per ArrayRecord shard (file layout only; records do not depend on it)
META_FILE = "pack_meta.json"
BUILD_COMMAND = "python -m dispersion_jax data-build --config CFG"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def features(seq_len: int, dtype) -> "tfds.features.FeaturesDict":  # noqa: F821
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds.features.FeaturesDict(
      {
          "tokens": tfds.features.Tensor(
              shape=(seq_len + 1,), dtype=np.dtype(dtype), encoding=tfds.features.Encoding.BYTES
          ),
          "doc_starts": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES),
      }
  )


def record_serializer(seq_len: int, dtype):
  """(tokens, doc_starts) -> the record's bytes: a tf.Example as TFDS writes it, but serialized deterministically
  (the map of features is otherwise ordered by a per-process string hash, and files would differ between runs)."""
  from tensorflow_datasets.core import example_serializer  # noqa: PLC0415

  feats = features(seq_len, dtype)
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())

  def serialize(tokens: np.ndarray, doc_starts: np.ndarray) -> bytes:
    example = feats.encode_example({"tokens": tokens, "doc_starts": doc_starts})
    return serializer.get_tf_example(example).SerializeToString(deterministic=True)

  return serialize


def cache_root(cfg: DataConfig) -> str:
  root = cfg.cache_dir or cfg.data_dir
  if not root:
    from tensorflow_datasets.core import constants  # noqa: PLC0415 - honours $TFDS_DATA_DIR

    root = constants.DATA_DIR
  if paths.is_remote(root):
    paths.path(root, what="data.cache_dir" if cfg.cache_dir else "data.data_dir")  # s3:// refused in one line
    return paths.join(root, DATASET_NAME)
  return os.path.join(os.path.abspath(os.path.expanduser(os.fspath(root))), DATASET_NAME)


def staging_root(cfg: DataConfig, root: str) -> str:
  """Where a build writes before its dataset appears at `root`: `root` itself on a local disk (a rename publishes
  it); for a bucket, a local directory (data.staging_dir, else one under the system's temporary directory, per
  bucket prefix), since ArrayRecord writes local files only. The token files stay there for the next build."""
  if not paths.is_remote(root):
    return root
  if cfg.staging_dir:
    if paths.is_remote(cfg.staging_dir):
      raise DataError(
          f"data.staging_dir={cfg.staging_dir}: must be a local or mounted directory (ArrayRecord cannot write "
          "to a bucket); the built dataset goes to data.cache_dir"
      )
    base = os.path.abspath(os.path.expanduser(cfg.staging_dir))
  else:
    import tempfile  # noqa: PLC0415

    base = os.path.join(tempfile.gettempdir(), "dispersion-staging")
  slug = hashlib.sha256(root.encode()).hexdigest()[:12]
  return os.path.join(base, f"{root.split('://', 1)[1].split('/', 1)[0]}-{slug}", DATASET_NAME)


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Identity:
  """Where a (source, input, tokenizer, seq_len) dataset lives and what identifies it."""

  root: str  # <cache root>/dispersion_packed (a local path or gs://)
  name: str  # directory of the packed dataset
  fingerprint: str  # of input, tokenizer, seq_len and format version
  base: dict  # what the fingerprint hashes, less seq_len (JSON)
  seq_len: int
  tokenizer: str  # the tokenizer's stable name ("gpt2", "hf-<hash>")
  tokenizer_spec: str  # the tokenizer argument ("gpt2" or a directory), for the worker processes
  vocab_size: int
  eos_id: int
  dtype: str
  inputs: inputs_lib.Inputs
  staging: str  # a local directory: the build's token files and temporary output (`root` itself when local)

  @property
  def path(self) -> str:
    return paths.join(self.root, self.name)

  def built(self) -> bool:
    """Whether the dataset exists: a directory on a local disk, a published prefix in a bucket."""
    return transfer.is_published(self.path)

  def token_key(self, units) -> str:
    """The key of the stage-A token files: input, tokenizer, format version and the work units (no seq_len)."""
    return _hash({"base": self.base, "units": [inputs_lib.unit_key(u) for u in units]})

  def token_path(self, units) -> str:
    return os.path.join(self.staging, "tokens", f"{self.inputs.label}-{self.tokenizer}-{self.token_key(units)}")


def identify(cfg: DataConfig, *, tokenizer: str, seq_len: int) -> Identity:
  """The dataset's identity: reads input file stats and the ends of each file (for the fingerprint), not the data."""
  if seq_len < 1:
    raise DataError(f"seq_len={seq_len} must be >= 1")
  try:
    tok = tokenizer_lib.get_tokenizer(tokenizer)
  except ValueError as e:
    raise DataError(f"tokenizer: {e}") from None
  inputs = inputs_lib.describe_inputs(cfg)
  base = {
      "format": FORMAT_VERSION,
      "input": inputs.identity,
      "validation_fraction": _validation_fraction(),
      "tokenizer": tok.name,
      "eos_id": tok.eos_id,
      "vocab_size": tok.vocab_size,
  }
  fingerprint = _hash({**base, "seq_len": seq_len})
  root = cache_root(cfg)
  return Identity(
      root,
      f"{inputs.label}-{tok.name}-L{seq_len}-{fingerprint}",
      fingerprint,
      base,
      seq_len,
      tok.name,
      tokenizer,
      tok.vocab_size,
      tok.eos_id,
      token_dtype(tok.vocab_size).name,
      inputs,
      staging_root(cfg, root),
  )


def _validation_fraction() -> float:
  from dispersion_jax.data import corpus  # noqa: PLC0415

  return corpus.VALIDATION_FRACTION


class PackedDataset:
  """A built dataset: blocks of `seq_len + 1` tokens per split, read by index (thread-safe, random access)."""

  def __init__(self, path: str):
    if paths.is_remote(path) and not transfer.is_published(path):
      raise DataError(
          f"{path} is an unfinished upload (no {transfer.MARKER}); re-run the build to finish it: "
          f"`{BUILD_COMMAND}`"
      )
    try:
      self.meta = json.loads(paths.path(path).joinpath(META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise DataError(
          f"{path} is not a built dataset ({META_FILE}: {type(e).__name__}); rebuild it with " f"`{BUILD_COMMAND}`"
      ) from None
    if self.meta.get("format") != FORMAT_VERSION:
      raise DataError(
          f"{path} was built by another version of the data format ({self.meta.get('format')}, "
          f"this code reads {FORMAT_VERSION}); rebuild it with `{BUILD_COMMAND}`"
      )
    self.path = path
    self.fingerprint: str = self.meta["fingerprint"]
    self.seq_len: int = self.meta["seq_len"]
    self.eos_id: int = self.meta["eos_id"]
    self.dtype = np.dtype(self.meta["dtype"])

  def __repr__(self) -> str:
    return f"PackedDataset({self.path!r}, blocks={self.meta['blocks']})"

  def num_blocks(self, split: str) -> int:
    self._check_split(split)
    return int(self.meta["blocks"][split])

  def _check_split(self, split: str) -> None:
    if split not in SPLITS:
      raise DataError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")

  @functools.cached_property
  def _builder(self):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    return tfds.builder_from_directory(self.path)

  @functools.lru_cache(maxsize=None)  # noqa: B019 - one source per split for the dataset's lifetime
  def source(self, split: str):
    """The split's TFDS ArrayRecord data source (`__len__`, `__getitems__` -> decoded dicts)."""
    self._check_split(split)
    return self._builder.as_data_source(split)

  @functools.lru_cache(maxsize=None)  # noqa: B019
  def _records(self, split: str):
    """The raw records (bytes) of a split, or None where TFDS hides them (then `read` decodes through TFDS).

    TFDS's `__getitems__` starts a thread pool per call (~1-3 ms): for a few dozen 2 KB records per step, one
    thread reading and parsing them is several times faster. Checked against TFDS's decoding on the first record."""
    src = self.source(split)
    raw = getattr(src, "data_source", None)
    if raw is None or len(src) == 0:
      return None
    want, got = src[0], _parse(raw[0], self.dtype)
    if not (np.array_equal(want["tokens"], got[0]) and np.array_equal(want["doc_starts"], got[1])):
      return None
    return raw

  def read(self, split: str, blocks) -> tuple[np.ndarray, list[np.ndarray]]:
    """(tokens uint[n, L+1], doc_starts per block) of the given block indices (thread-safe)."""
    blocks = [int(b) for b in blocks]
    if not blocks:
      return np.zeros((0, self.seq_len + 1), self.dtype), []
    raw = self._records(split)
    if raw is None:
      records = self.source(split).__getitems__(blocks)
      return np.stack([r["tokens"] for r in records]), [r["doc_starts"] for r in records]
    tokens = np.empty((len(blocks), self.seq_len + 1), self.dtype)
    starts = []
    for i, b in enumerate(blocks):
      tokens[i], s = _parse(raw[b], self.dtype)
      starts.append(s)
    return tokens, starts


def _parse(record: bytes, dtype) -> tuple[np.ndarray, np.ndarray]:
  """A record (tf.Example with two BYTES tensors) -> (tokens, doc_starts)."""
  from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415 - protobuf (upb), no TensorFlow

  feature = tf_example_pb2.Example.FromString(record).features.feature
  return (
      np.frombuffer(feature["tokens"].bytes_list.value[0], dtype),
      np.frombuffer(feature["doc_starts"].bytes_list.value[0], np.int32),
  )


def open_path(path: str) -> PackedDataset:
  """A built dataset by its directory (as `BuildReport.path` or `PackedDataset.path` name it)."""
  if not paths.is_dir(path, what="dataset"):
    raise DataError(f"no built dataset at {path}; build it with `{BUILD_COMMAND}`")
  return PackedDataset(path)


def build_command(cfg: DataConfig, *, tokenizer: str, seq_len: int, config: str = "CFG") -> str:
  """The command that builds this dataset: the run config file (`config`) with the data settings as flags."""
  flags = [f"--config.{k}={v}" for k, v in (("seq_len", seq_len), ("tokenizer", tokenizer))]
  default = DataConfig()
  for f in dataclasses.fields(DataConfig):
    value = getattr(cfg, f.name)
    if value != getattr(default, f.name) and f.name not in ("read_threads",):
      flags.append(f"--config.data.{f.name}={value}")
  return " ".join(["python -m dispersion_jax data-build --config", config, *(shlex.quote(x) for x in flags)])


def open_packed(cfg: DataConfig, *, tokenizer: str, seq_len: int) -> PackedDataset:
  """The built dataset of this data config, tokenizer and seq_len; a DataError naming the build command if there is
  none (or only one of other inputs: an edited input has a new fingerprint)."""
  ident = identify(cfg, tokenizer=tokenizer, seq_len=seq_len)
  return open_identity(ident, build_command(cfg, tokenizer=tokenizer, seq_len=seq_len))


def open_identity(ident: Identity, command: str = BUILD_COMMAND) -> PackedDataset:
  """The dataset `ident` names; DatasetNotBuiltError (ending with `command`) when it was not built."""
  if not ident.built():
    root = paths.path(ident.root)
    others = (
        sorted(p.name for p in root.iterdir() if p.name.startswith(f"{ident.inputs.label}-"))
        if root.is_dir()
        else []
    )
    hint = f" ({len(others)} other build(s) of this input exist: inputs, tokenizer or seq_len differ)" if others else ""
    raise DatasetNotBuiltError(
        f"no built dataset for {ident.inputs.describe()} with tokenizer {ident.tokenizer} and "
        f"seq_len={ident.seq_len} in {ident.root}{hint}",
        command,
    )
  ds = PackedDataset(ident.path)
  if ds.fingerprint != ident.fingerprint:
    raise DataError(
        f"{ident.path} has fingerprint {ds.fingerprint}, expected {ident.fingerprint}; delete it and "
        f"rebuild with `{BUILD_COMMAND}`"
    )
  return ds


# ---------------------------------------------------------------------------------------------------------------
# Stage C worker: one shard of blocks of a split's stream -> one ArrayRecord file.


def write_shard(task: dict) -> tuple[str, int, int, int]:
  """Writes blocks [b0, b1) of a split into `task["out"]`; returns (split, shard, file size, blocks). Runs in a
  worker process."""
  from tensorflow_datasets.core import file_adapters  # noqa: PLC0415

  seq_len, dtype = task["seq_len"], np.dtype(task["dtype"])
  width = seq_len + 1
  segments = np.load(task["segments"])  # int64[n, 4]: unit, split code, token lo, token hi
  starts = np.load(task["starts"], mmap_mode="r")  # int64[docs]: stream offset of each document's first token
  o0, o1 = task["b0"] * width, task["b1"] * width
  seg_end = np.cumsum(segments[:, 3] - segments[:, 2])
  seg_begin = seg_end - (segments[:, 3] - segments[:, 2])
  buf = np.empty(o1 - o0, dtype)
  first = int(np.searchsorted(seg_end, o0, side="right"))
  pos = o0
  for s in range(first, len(segments)):
    if pos >= o1:
      break
    unit, split_code, lo, _ = (int(x) for x in segments[s])
    tokens = np.load(token_files.unit_file(task["token_dir"], unit, SPLITS[split_code], "tok"), mmap_mode="r")
    a = lo + (pos - seg_begin[s])
    n = min(o1 - pos, seg_end[s] - pos)
    buf[pos - o0 : pos - o0 + n] = tokens[a : a + n]
    pos += n
  blocks = buf.reshape(-1, width)
  inner = np.asarray(starts[np.searchsorted(starts, o0, side="right") : np.searchsorted(starts, o1, side="left")])
  rel = inner - o0
  inner_block, inner_pos = rel // width, (rel % width).astype(np.int32)
  keep = inner_pos > 0  # a document starting a block gets segment id 1 anyway
  inner_block, inner_pos = inner_block[keep], inner_pos[keep]
  bounds = np.searchsorted(inner_block, np.arange(len(blocks) + 1))
  serialize = record_serializer(seq_len, dtype)
  records = ((None, serialize(blocks[i], inner_pos[bounds[i] : bounds[i + 1]])) for i in range(len(blocks)))
  file_adapters.ArrayRecordFileAdapter.write_examples(task["out"], records)
  return task["split"], task["shard"], os.path.getsize(task["out"]), len(blocks)
