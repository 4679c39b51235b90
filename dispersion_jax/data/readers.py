"""Reading a work unit (`inputs.Unit`): the rows of each format, and their grouping into documents.

A document is (id, text); the ids depend only on the input, never on the units (see `inputs.py`).
"""

import functools
import itertools
import json
import re
from typing import Callable, Iterable, Iterator

import numpy as np

from dispersion_jax.data import corpus
from dispersion_jax.data.config import DataConfig
from dispersion_jax.data.inputs import Unit, describe_inputs, one_line, open_parquet, plan_units
from dispersion_jax.data.listing import open_input
from dispersion_jax.errors import DataError

_HEADING = re.compile(r" = [^=](?:.*[^=])? = ")  # a wikitext level-1 heading row: " = Title = "

Doc = tuple[str, str]


def _decode(data: bytes, path: str, offset: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}); re-encode it as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or remove it"
    ) from None


def _lines(path: str, lo: int, hi: int | None = None) -> Iterator[tuple[int, bytes]]:
  """(byte offset, line) of the lines that start in [lo, hi) (hi None = to the end)."""
  try:
    with open_input(path) as f:
      if lo > 0:
        f.seek(lo - 1)
        if f.read(1) != b"\n":
          f.readline()  # the line in progress at lo belongs to the previous range
      pos = f.tell()
      while hi is None or pos < hi:
        line = f.readline()
        if not line:
          return
        yield pos, line
        pos += len(line)
  except OSError as e:
    raise DataError(f"cannot read input file {path} ({e.strerror or e}); fix its permissions or remove it") from None


def _line_number(path: str, pos: int) -> int:
  """The 1-based number of the line that starts at byte `pos` (for error messages: reads the file up to `pos`)."""
  n = 1
  with open_input(path) as f:
    while pos > 0:
      chunk = f.read(min(pos, 1 << 20))
      if not chunk:
        break
      n += chunk.count(b"\n")
      pos -= len(chunk)
  return n


def _jsonl_rows(path: str, rel: str, text_key: str, lo: int, hi: int | None = None) -> Iterator[Doc]:
  for pos, raw in _lines(path, lo, hi):
    line = _decode(raw, path, pos)
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
      text = obj[text_key]
      if text is None:
        text = ""
      if not isinstance(text, str):
        raise TypeError(f"{text_key!r} is a {type(text).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
      raise DataError(
          f"{path}: line {_line_number(path, pos)} (byte {pos}) is not a JSON object with a {text_key!r} string "
          f"({type(e).__name__}: {one_line(e)}); fix the line or set --config.data.text_key"
      ) from None
    yield f"{rel}@{pos}", text


def _text_lines(path: str, rel: str, lo: int, hi: int | None = None) -> Iterator[Doc]:
  for pos, raw in _lines(path, lo, hi):
    yield f"{rel}@{pos}", _decode(raw, path, pos)


def _parquet_rows(path: str, rel: str, text_key: str, lo: int, hi: int | None = None) -> Iterator[Doc]:
  pf = open_parquet(path)
  md = pf.metadata
  row = sum(md.row_group(g).num_rows for g in range(lo))
  for g in range(lo, md.num_row_groups if hi is None else hi):
    try:
      values = pf.read_row_group(g, columns=[text_key]).column(0).to_pylist()
    except UnicodeDecodeError as e:
      raise DataError(f"{path} (row group {g}) is not UTF-8 text ({one_line(e)}); re-encode it or remove it") from None
    except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ...
      raise DataError(
          f"{path} (row group {g}) is not readable ({type(e).__name__}: {one_line(e)}); " "fix or remove it"
      ) from None
    for i, v in enumerate(values):
      if isinstance(v, bytes):
        v = _decode(v, f"{path} (row {row + i})", 0)
      elif v is None:
        v = ""
      elif not isinstance(v, str):
        raise DataError(
            f"{path}: column {text_key!r} holds {type(v).__name__} values, not text; " "set --config.data.text_key"
        )
      yield f"{rel}:{row + i}", v
    row += len(values)


@functools.lru_cache(maxsize=4)
def _tfds_source(dataset_dir: str, split: str):
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds.builder_from_directory(dataset_dir).as_data_source(split)


def _tfds_rows(dataset_dir: str, split: str, text_key: str, lo: int, hi: int | None = None) -> Iterator[Doc]:
  src = _tfds_source(dataset_dir, split)
  hi = len(src) if hi is None else hi
  for a in range(lo, hi, 256):
    for i, ex in enumerate(src.__getitems__(list(range(a, min(a + 256, hi)))), a):
      if text_key not in ex:
        raise DataError(
            f"TFDS dataset in {dataset_dir} has no feature {text_key!r} (features: "
            f"{', '.join(ex)}); set --config.data.text_key"
        )
      v = ex[text_key]
      if isinstance(v, (bytes, np.bytes_)):
        v = _decode(bytes(v), f"TFDS dataset {dataset_dir} split {split} example {i}", 0)
      yield f"{split}:{i}", str(v)


def is_heading(text: str) -> bool:
  """A wikitext level-1 heading (" = Title = "), which starts an article; " = = Section = = " does not."""
  return _HEADING.fullmatch(text.rstrip("\r\n")) is not None


def _article(doc_id: str | None, parts: list[str]) -> Iterator[Doc]:
  text = "".join(p if not p or p.endswith("\n") else p + "\n" for p in parts)
  if doc_id is not None and text.strip():
    yield doc_id, text


def group_rows(rows: Iterable[Doc], after: Callable[[], Iterable[Doc]], *, first: bool, grouping: str) -> Iterator[Doc]:
  """Documents from rows. "row": every non-blank row. "wikitext": an article per level-1 heading; rows before the
  first heading of a unit that does not start its file belong to the previous unit's article (which reads on
  through `after`, the rows past the unit's end, up to the next heading)."""
  if grouping == "row":
    yield from ((i, t) for i, t in rows if t.strip())
    return
  doc_id, parts, started = None, [], first
  for row_id, text in rows:
    if is_heading(text):
      yield from _article(doc_id, parts)
      doc_id, parts, started = row_id, [text], True
    elif started:
      doc_id = row_id if doc_id is None else doc_id
      parts.append(text)
  if started:
    for row_id, text in after():
      if is_heading(text):
        break
      doc_id = row_id if doc_id is None else doc_id
      parts.append(text)
    yield from _article(doc_id, parts)


def unit_docs(unit: Unit, text_key: str, grouping: str) -> Iterator[Doc]:
  """The documents of a unit, in order."""
  if unit.kind == "default":
    yield from ((i, t) for i, t in corpus.default_part_docs(unit.path) if t.strip())
    return
  if unit.kind == "txt":
    for path, rel in unit.files:
      try:
        with open_input(path) as f:
          data = f.read()
      except OSError as e:
        raise DataError(
            f"cannot read input file {path} ({e.strerror or e}); fix its permissions or remove " "it"
        ) from None
      text = _decode(data, path, 0)
      if text.strip():
        yield rel, text
    return
  reader = {
      "parquet": functools.partial(_parquet_rows, unit.path, unit.rel, text_key),
      "jsonl": functools.partial(_jsonl_rows, unit.path, unit.rel, text_key),
      "lines": functools.partial(_text_lines, unit.path, unit.rel),
      "tfds": functools.partial(_tfds_rows, unit.path, unit.rel, text_key),
  }[unit.kind]
  yield from group_rows(reader(unit.lo, unit.hi), lambda: reader(unit.hi, None), first=unit.lo == 0, grouping=grouping)


def first_docs(cfg: DataConfig, n: int) -> list[Doc]:
  """The first `n` documents of the input in build order (for inspection and tests)."""
  inputs = describe_inputs(cfg)
  docs = itertools.chain.from_iterable(unit_docs(u, cfg.text_key, cfg.doc_grouping) for u in plan_units(cfg, inputs))
  return list(itertools.islice(docs, n))
