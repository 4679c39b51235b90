"""Finding a build's input files, on a local disk or in a bucket (gs://, through `storage.paths`), and opening them.

A local `data.text_dir` is a directory (searched recursively; hidden files and folders skipped), a file, or a glob
(`**` allowed); in a bucket it is a prefix (searched recursively) or a glob with `*` (etils refuses `**` on gs://,
one request per folder). Files are named relative to the root the search starts from: the names that document ids
and the dataset fingerprint use, the same for a corpus on a disk and its copy in a bucket.
"""

import glob
import os
import re

from dispersion_jax.errors import DataError
from dispersion_jax.storage import paths

FORMATS = (".parquet", ".jsonl", ".txt")


def _has_magic(path: str) -> bool:
  return re.search(r"[*?[]", path) is not None


def open_input(path: str):
  """An input file, local or gs://, opened for reading (binary, seekable; gcsfs reads ahead in blocks)."""
  if paths.is_remote(path):
    return paths.path(path, what="data.text_dir").open("rb")
  return open(path, "rb")


def file_size(path: str) -> int:
  return paths.path(path).stat().length if paths.is_remote(path) else os.path.getsize(path)


def _list_remote(text_dir: str, fix: str) -> tuple[str, list[str]]:
  """`list_files`'s search in a bucket (a gs:// prefix or glob): its objects, listed through etils (gcsfs)."""
  pattern = text_dir.rstrip("/")
  scheme, _, rest = pattern.partition("://")
  parts = rest.split("/")
  if _has_magic(rest):
    cut = next(i for i, p in enumerate(parts) if _has_magic(p))
    root = f"{scheme}://{'/'.join(parts[:cut])}"
    try:
      matches = list(paths.path(root, what="data.text_dir").glob("/".join(parts[cut:])))
    except NotImplementedError:  # etils refuses ** on gs:// (one request per directory)
      raise DataError(f"data.text_dir={text_dir!r}: ** cannot be used in a bucket; give the prefix (searched "
                      "recursively) or a glob with *") from None
  else:
    root, matches = pattern, [paths.path(pattern, what="data.text_dir")]
    if not matches[0].is_dir():
      if not matches[0].exists():
        raise DataError(f"data.text_dir={text_dir!r} does not exist; {fix}")
      root = pattern.rsplit("/", 1)[0]
  files = set()
  for m in matches:
    if not m.is_dir():
      files.add(os.fspath(m))
      continue
    for dirpath, dirs, names in m.walk():
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      where = os.fspath(dirpath)  # gcsfs walks without the scheme
      where = where if "://" in where else f"{scheme}://{where}"
      files.update(f"{where}/{n}" for n in names if not n.startswith("."))
  return root, list(files)


def list_files(text_dir: str) -> tuple[str, list[str]]:
  """(root the relative names start from, the input files under it)."""
  fix = "set --config.data.text_dir to a directory or glob of .parquet / .jsonl / .txt files"
  if not text_dir:
    raise DataError(f"data.source='text_dir' needs data.text_dir; {fix}")
  root, found = _list_remote(text_dir, fix) if paths.is_remote(text_dir) else _list_local(text_dir, fix)
  files = [f for f in found if f.endswith(FORMATS)]
  if not files:
    raise DataError(f"data.text_dir={text_dir!r} has no .parquet, .jsonl or .txt files; add some, or {fix}")
  return root, sorted(files, key=lambda f: rel_name(f, root))


def _list_local(text_dir: str, fix: str) -> tuple[str, list[str]]:
  """`list_files`'s search on a local (or mounted) file system; `**` allowed in a glob."""
  pattern = os.path.abspath(os.path.expanduser(text_dir))
  if _has_magic(pattern):
    parts = pattern.split(os.sep)
    cut = next(i for i, p in enumerate(parts) if _has_magic(p))
    root = os.sep.join(parts[:cut]) or os.sep
    matches = glob.glob(pattern, recursive=True)
  elif os.path.isdir(pattern):
    root, matches = pattern, [pattern]
  elif os.path.isfile(pattern):
    root, matches = os.path.dirname(pattern), [pattern]
  else:
    raise DataError(f"data.text_dir={text_dir!r} does not exist; {fix}")
  files = set()
  for m in matches:
    if os.path.isdir(m):
      for dirpath, dirs, names in os.walk(m):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.update(os.path.join(dirpath, n) for n in names if not n.startswith("."))
    elif os.path.isfile(m):
      files.add(m)
  return root, list(files)


def rel_name(path: str, root: str) -> str:
  if paths.is_remote(path):
    return path[len(root.rstrip("/")) + 1 :]
  return os.path.relpath(path, root).replace(os.sep, "/")
