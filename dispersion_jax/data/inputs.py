"""Build inputs: what a dataset is made of, and the fixed work units of a build (`readers.py` reads them).

Inputs (`DataConfig.source`):
- "text_dir": a directory (searched recursively; hidden files skipped) or a glob of `.parquet` / `.jsonl` /
  `.txt` files, read in sorted order of their relative paths. The text is the `text_key` column (parquet) or
  field (jsonl); a `.txt` file is one document. Files named like a split (`validation-00000-of-00001.parquet`,
  `train/part.jsonl`, ...) give the splits: `validation_split` files are the validation set and `train` files (or,
  if there are none, every other file) the training set; without validation files, ~2% of documents are held out
  by a hash of their id (`corpus.doc_hash`).
- "tfds": a TFDS dataset prepared as ArrayRecord (`tfds build NAME --file_format=array_record`): splits "train"
  and `validation_split` ("" = hash the train split).
- "default": the embedded corpus (`corpus.default_docs`), hash split.

Work units are a pure function of the input, never of the worker count: parquet row groups (consecutive ones up to
`UNIT_BYTES`), byte ranges of `.jsonl` files (and of `.txt` files when their lines are rows), groups of whole
`.txt` files, index ranges of a TFDS split, the parts of the default corpus. Document ids do not depend on the
units either (`file:row`, `file@byte_offset`, `file`, `split:index`), and an article of `doc_grouping="wikitext"`
that crosses a unit boundary is read whole by the unit it starts in, so the documents and their order do not
depend on `UNIT_BYTES`; it only sets the granularity of the parallel work.
"""

import dataclasses
import hashlib
import os
import re
from typing import Iterable

from dispersion_jax.data import corpus, listing
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import DataError
from dispersion_jax.storage import paths

FORMATS = listing.FORMATS
TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)
UNIT_BYTES = 64 << 20  # input bytes per work unit (granularity only: the output does not depend on it)
_SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test")
_HEAD_TAIL = 1 << 16  # bytes hashed at each end of a file for its fingerprint


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str  # absolute
  rel: str  # relative to the text_dir root (POSIX): the name in document ids
  size: int
  split: str | None  # TRAIN / VALIDATION from the file name, None = by document hash


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a dataset is built from: `identity` (JSON) is hashed into the dataset fingerprint."""

  source: str
  label: str  # short, readable part of the cache directory name
  identity: dict  # no absolute paths: moved or copied inputs keep their fingerprint
  files: tuple[InputFile, ...] = ()
  ignored: tuple[str, ...] = ()  # files of other splits (e.g. test-*.parquet), not read
  tfds_dir: str = ""  # source=tfds: the prepared dataset's directory
  tfds_splits: tuple[tuple[str, str], ...] = ()  # (our split, the TFDS split); no validation entry = hash
  where: str = ""  # source=text_dir: data.text_dir as given (for messages)

  def describe(self) -> str:
    return {"default": "the default corpus", "tfds": f"TFDS dataset {self.identity.get('tfds_name')!r}"}.get(
        self.source, f"data.text_dir={self.where!r}"
    )


@dataclasses.dataclass(frozen=True)
class Unit:
  """One work unit of stage A (tokenize)."""

  kind: str  # parquet | jsonl | lines (txt lines as rows) | txt (whole files) | tfds | default
  path: str  # the file, the TFDS dataset dir, or the default-corpus part
  rel: str  # the name in document ids (relative path, TFDS split)
  lo: int = 0  # parquet: row groups [lo, hi); jsonl / lines: bytes [lo, hi); tfds: examples
  hi: int = 0
  split: str | None = None  # the split of every document of the unit; None = by document hash
  files: tuple[tuple[str, str], ...] = ()  # kind txt: (path, rel) of whole files, one document each
  nbytes: int = 0  # input bytes (approximate; for progress)


# ---------------------------------------------------------------------------------------------------------------
# Finding the input and its identity (cheap: file stats and a hash of each file's ends).


def describe_inputs(cfg: DataConfig) -> Inputs:
  if cfg.source == "default":
    return Inputs("default", "default", {"source": "default", "corpus": corpus.default_corpus_version()})
  if cfg.source == "tfds":
    return _tfds_inputs(cfg)
  return _text_dir_inputs(cfg)


def file_split_name(rel: str, names: Iterable[str]) -> str | None:
  """The split a file's relative path names: a directory called like a split, or a file `<split>[-_.]...`."""
  names = [n for n in names if n]
  *dirs, base = rel.split("/")
  for d in dirs:
    if d in names:
      return d
  for n in sorted(names, key=len, reverse=True):
    if re.match(rf"{re.escape(n)}(?:[-_.]|$)", base):
      return n
  return None


def _head_tail_hash(path: str, size: int) -> str:
  try:
    with listing.open_input(path) as f:
      h = hashlib.sha1(f.read(_HEAD_TAIL))
      if size > _HEAD_TAIL:
        f.seek(max(_HEAD_TAIL, size - _HEAD_TAIL))
        h.update(f.read())
  except OSError as e:
    raise DataError(f"cannot read input file {path} ({e.strerror or e}); fix its permissions or remove it") from None
  return h.hexdigest()[:16]


def _text_dir_inputs(cfg: DataConfig) -> Inputs:
  root, paths = listing.list_files(cfg.text_dir)
  names = (*_SPLIT_NAMES, cfg.validation_split)
  named = {p: file_split_name(listing.rel_name(p, root), names) for p in paths}
  val = [p for p in paths if cfg.validation_split and named[p] == cfg.validation_split]
  train_named = [p for p in paths if named[p] == TRAIN]
  if val:
    train = train_named or [p for p in paths if named[p] is None]
    splits = {**{p: VALIDATION for p in val}, **{p: TRAIN for p in train}}
  else:
    splits = {p: None for p in (train_named or paths)}
  files, ignored = [], []
  for p in paths:
    if p not in splits:
      ignored.append(listing.rel_name(p, root))
      continue
    size = listing.file_size(p)
    files.append(InputFile(p, listing.rel_name(p, root), size, splits[p]))
  if not any(f.split != VALIDATION for f in files):
    raise DataError(
        f"data.text_dir={cfg.text_dir!r} has validation files but no training files (train-*.parquet, "
        "train/..., or files without a split name); add some or set --config.data.validation_split=''"
    )
  identity = {
      "source": "text_dir",
      "text_key": cfg.text_key,
      "doc_grouping": cfg.doc_grouping,
      "files": [[f.rel, f.size, f.split, _head_tail_hash(f.path, f.size)] for f in files],
  }
  return Inputs("text_dir", "textdir", identity, tuple(files), tuple(ignored), where=cfg.text_dir)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "x"


def _tfds_inputs(cfg: DataConfig) -> Inputs:
  import tensorflow_datasets as tfds  # noqa: PLC0415 - only for this source (slow import)

  name, data_dir = cfg.tfds_name, cfg.data_dir
  fix = (
      f"run `tfds build {name} --file_format=array_record{' --data_dir=' + data_dir if data_dir else ''}` "
      "or set --config.data.data_dir"
  )
  if not name:
    raise DataError(
        "data.source='tfds' needs a dataset; set --config.data.tfds_name " "(e.g. wikitext/wikitext-103-raw-v1)"
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - TFDS raises several types (DatasetNotFoundError, ValueError, ...)
    raise DataError(
        f"TFDS dataset {name!r} not found in data dir {data_dir or '(TFDS default)'} " f"({type(e).__name__}); {fix}"
    ) from None
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; {fix}")
  have = list(builder.info.splits)
  if TRAIN not in have:
    raise DataError(f"TFDS dataset {name!r} has no split 'train' (has {have}); use a dataset with a train split")
  splits = [(TRAIN, TRAIN)]
  if cfg.validation_split:
    if cfg.validation_split not in have:
      raise DataError(
          f"TFDS dataset {name!r} has no split {cfg.validation_split!r} (has {have}); set "
          "--config.data.validation_split to one of them, or '' to hold out 2% of train by hash"
      )
    splits.append((VALIDATION, cfg.validation_split))
  info = builder.info
  if cfg.doc_grouping == "wikitext" and not info.disable_shuffling:
    raise DataError(
        f"TFDS dataset {name!r} stores its rows shuffled (disable_shuffling=False), so they cannot be "
        "joined into articles; set --config.data.doc_grouping=row or build from the parquet files"
    )
  identity = {
      "source": "tfds",
      "tfds_name": name,
      "version": str(info.version),
      "text_key": cfg.text_key,
      "doc_grouping": cfg.doc_grouping,
      "splits": {
          ours: [theirs, list(info.splits[theirs].shard_lengths), int(info.splits[theirs].num_bytes)]
          for ours, theirs in splits
      },
  }
  return Inputs(
      "tfds",
      "tfds-" + _slug(name.replace("/", "-")),
      identity,
      tfds_dir=os.fspath(builder.data_dir),
      tfds_splits=tuple(splits),
  )


# ---------------------------------------------------------------------------------------------------------------
# Work units (reads parquet footers and TFDS metadata; never the data).


def plan_units(cfg: DataConfig, inputs: Inputs) -> list[Unit]:
  if inputs.source == "default":
    return [Unit("default", part, part, nbytes=corpus.default_part_bytes(part)) for part in corpus.default_parts()]
  if inputs.source == "tfds":
    return _tfds_units(inputs)
  units: list[Unit] = []
  txt_group: list[InputFile] = []
  group_bytes = 0

  def flush():
    nonlocal group_bytes
    if txt_group:
      units.append(
          Unit(
              "txt",
              txt_group[0].path,
              txt_group[0].rel,
              split=txt_group[0].split,
              files=tuple((f.path, f.rel) for f in txt_group),
              nbytes=group_bytes,
          )
      )
      txt_group.clear()
      group_bytes = 0

  for f in inputs.files:
    if f.path.endswith(".txt") and cfg.doc_grouping == "row":
      if txt_group and (txt_group[0].split != f.split or group_bytes + f.size > UNIT_BYTES):
        flush()
      txt_group.append(f)
      group_bytes += f.size
      continue
    flush()
    if f.path.endswith(".parquet"):
      units.extend(_parquet_units(f, cfg.text_key))
    else:
      kind = "jsonl" if f.path.endswith(".jsonl") else "lines"
      units.extend(
          Unit(kind, f.path, f.rel, lo, min(lo + UNIT_BYTES, f.size), f.split, nbytes=min(UNIT_BYTES, f.size - lo))
          for lo in range(0, f.size, UNIT_BYTES)
      )
  flush()
  return units


def open_parquet(path: str):
  import pyarrow.parquet as pq  # noqa: PLC0415

  try:
    return pq.ParquetFile(listing.open_input(path) if paths.is_remote(path) else path)
  except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ...
    raise DataError(
        f"{path} is not a readable parquet file ({type(e).__name__}: {one_line(e)}); " "fix or remove it"
    ) from None


def one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:200]


def _parquet_units(f: InputFile, text_key: str) -> list[Unit]:
  pf = open_parquet(f.path)
  columns = pf.schema_arrow.names
  if text_key not in columns:
    raise DataError(
        f"{f.path} has no column {text_key!r} (columns: {', '.join(columns[:12])}); " "set --config.data.text_key"
    )
  md, units, lo, nbytes = pf.metadata, [], 0, 0
  for g in range(md.num_row_groups):
    nbytes += md.row_group(g).total_byte_size
    if nbytes >= UNIT_BYTES or g == md.num_row_groups - 1:
      units.append(Unit("parquet", f.path, f.rel, lo, g + 1, f.split, nbytes=nbytes))
      lo, nbytes = g + 1, 0
  return units


def _tfds_units(inputs: Inputs) -> list[Unit]:
  units = []
  for ours, theirs in inputs.tfds_splits:
    lengths, nbytes = inputs.identity["splits"][ours][1:]
    n = sum(lengths)
    per = max(1, int(UNIT_BYTES * n / max(nbytes, 1)))
    split = ours if len(inputs.tfds_splits) > 1 else None
    units.extend(
        Unit(
            "tfds",
            inputs.tfds_dir,
            theirs,
            lo,
            min(lo + per, n),
            split,
            nbytes=int(nbytes * (min(lo + per, n) - lo) / max(n, 1)),
        )
        for lo in range(0, n, per)
    )
  return units


def unit_key(unit: Unit) -> list:
  """A unit's identity without absolute paths (for the key of the stage-A token files)."""
  return [unit.kind, unit.rel, unit.lo, unit.hi, unit.split, [rel for _, rel in unit.files]]
