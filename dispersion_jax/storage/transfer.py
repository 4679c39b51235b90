"""Moving finished directories between a local disk and a bucket: all-or-nothing publishing, and local copies of
remote inputs for the readers that need a local file (safetensors, tokenizers).

A bucket has no directory rename (etils renames object by object), so `publish` to gs:// uploads every file and
then writes the marker object MARKER last: a prefix without it is unfinished (a killed upload) and is never taken
for a finished one (`is_published`); publishing again replaces it. Locally `publish` is the atomic os.rename it
always was.
"""

import contextlib
import functools
import os
import shutil
import tempfile

from dispersion_jax.storage import paths

MARKER = "_PUBLISHED"


def is_published(dest: str | os.PathLike) -> bool:
  """Whether `dest` holds a finished directory: a directory on a local disk, a marked prefix in a bucket."""
  if not paths.is_remote(dest):
    return os.path.isdir(dest)
  return paths.path(dest, s3=True).joinpath(MARKER).exists()


def publish(src: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Makes the finished local directory `src` the directory `dest`, all-or-nothing, and removes `src`.

  Local `dest`: os.rename (atomic; `dest` must not exist, as with os.rename). Bucket `dest`: whatever an earlier,
  unfinished upload left there is deleted, every file is uploaded, and the marker is written last."""
  if not paths.is_remote(dest):
    os.rename(src, dest)
    return
  upload_dir(src, dest)
  paths.path(dest, s3=True).joinpath(MARKER).write_text("")
  shutil.rmtree(src)


def upload_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Copies the local directory tree `src` to `dest` (a bucket prefix or a local directory), replacing what was
  there (a bucket prefix is emptied first: no object of an earlier upload survives)."""
  target = paths.path(dest, s3=True)
  if paths.is_remote(dest):
    if target.exists():
      target.rmtree()
  elif target.exists():
    shutil.rmtree(target)
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    for f in sorted(files):
      out = target if rel == "." else target.joinpath(*rel.split(os.sep))
      out.mkdir(parents=True, exist_ok=True)
      out.joinpath(f).write_bytes(open(os.path.join(root, f), "rb").read())


def download_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Copies the tree under the bucket prefix (or local directory) `src` into the local directory `dest`."""
  base = paths.path(src, s3=True)
  stack = [base]
  while stack:
    d = stack.pop()
    for p in d.iterdir():
      rel = os.path.relpath(str(p), str(base)) if not paths.is_remote(src) else str(p)[len(str(base)) + 1 :]
      if p.is_dir():
        stack.append(p)
      elif p.name != MARKER:
        out = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as fh:
          fh.write(p.read_bytes())


@contextlib.contextmanager
def local_dir(src: str | os.PathLike):
  """`src` as a local directory for the block: itself if local, else a temporary download removed afterwards."""
  if not paths.is_remote(src):
    yield os.fspath(src)
    return
  with tempfile.TemporaryDirectory(prefix="dispersion-download-") as tmp:
    download_dir(src, tmp)
    yield tmp


@contextlib.contextmanager
def output_dir(dest: str | os.PathLike):
  """A local directory to write into; for a bucket `dest`, a temporary one uploaded to `dest` when the block ends
  without an error (so a failed export leaves nothing in the bucket)."""
  if not paths.is_remote(dest):
    yield os.fspath(dest)
    return
  with tempfile.TemporaryDirectory(prefix="dispersion-upload-") as tmp:
    yield tmp
    upload_dir(tmp, dest)


def reads_dir(fn):
  """Decorates a reader `fn(directory, ...)` of local files so that `directory` may be a bucket prefix: it reads a
  temporary download, and its errors name the bucket path, not the download."""

  @functools.wraps(fn)
  def wrapper(directory, *args, **kw):
    if not paths.is_remote(directory):
      return fn(directory, *args, **kw)
    paths.path(directory, s3=False)
    with local_dir(directory) as local:
      try:
        return fn(local, *args, **kw)
      except (ValueError, OSError) as e:
        raise type(e)(str(e).replace(local, os.fspath(directory).rstrip("/"))) from None

  return wrapper


def writes_dir(fn):
  """Decorates a writer `fn(directory, ...)` of local files so that `directory` may be a bucket prefix: it writes a
  temporary directory, uploaded when `fn` returns."""

  @functools.wraps(fn)
  def wrapper(directory, *args, **kw):
    with output_dir(directory) as local:
      return fn(local, *args, **kw)

  return wrapper


class Mirror:
  """A local directory whose files are copied, whole, to a bucket prefix at each `sync()`: for writers that append
  to local files (TensorBoard's event files), since an append to a gs:// object replaces it. Only files that changed
  since the last sync are uploaded; each upload replaces the object atomically. `close()` syncs and removes the
  local directory. For a local `dest` the directory is `dest` itself and syncing does nothing."""

  def __init__(self, dest: str | os.PathLike):
    self.dest = dest
    self.remote = paths.is_remote(dest)
    self.local = tempfile.mkdtemp(prefix="dispersion-mirror-") if self.remote else os.fspath(dest)
    self._sent: dict[str, tuple[int, int]] = {}

  def sync(self) -> None:
    if not self.remote:
      return
    target = paths.path(self.dest)
    for name in sorted(os.listdir(self.local)):
      f = os.path.join(self.local, name)
      st = os.stat(f)
      if os.path.isfile(f) and self._sent.get(name) != (st.st_size, st.st_mtime_ns):
        with open(f, "rb") as fh:
          target.joinpath(name).write_bytes(fh.read())
        self._sent[name] = (st.st_size, st.st_mtime_ns)

  def close(self) -> None:
    if self.remote:
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)
