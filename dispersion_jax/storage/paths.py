"""Every path a run reads or writes, local or in a bucket: one type, `etils.epath.Path` (what Orbax itself uses).

Local paths keep pathlib's behaviour. `gs://` goes through etils (gcsfs without TensorFlow) for files and through
TensorStore for Orbax's arrays. Other schemes are refused in one line where a run cannot honour them (Orbax 0.12
writes arrays to gs:// and local disks only: ../shared/docs/object-storage.md). Build paths with `path()` and
`join()`, never with os.path: os.path.join("gs://b", "x") works, but os.path.isdir and open() on it create a local
folder named `gs:`.
"""

import contextlib
import io
import os
from collections.abc import Iterator

from etils import epath

from dispersion_jax.errors import ConfigError

REMOTE_SCHEMES = ("gs://", "s3://")

# gcsfs >= 2026 picks an "extended" file system that first asks the Storage Control API for the bucket's layout and,
# where it cannot (an emulator, missing credentials), logs a warning on every call before falling back to the
# classic one. The classic GCSFileSystem serves every bucket type; use it unless the user chose otherwise (this
# must be set before gcsfs is imported, which etils does lazily on the first gs:// access).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` names an object store (gs://, s3://) rather than a local (or mounted) file system."""
  return str(p).startswith(REMOTE_SCHEMES)


def path(p: str | os.PathLike, *, what: str = "path", s3: bool = False) -> epath.Path:
  """`p` as an epath.Path. `s3://` is refused (a ConfigError naming `what` and the fix) unless `s3=True`, for the
  few places that can honour it (exports, data reads)."""
  text = os.fspath(p)
  if text.startswith("s3://") and not s3:
    raise ConfigError(
        f"{what}={text}: s3:// cannot hold this (Orbax 0.12 writes arrays to gs:// and local disks only); "
        "use gs:// or mount the bucket (e.g. mountpoint-s3) and give the mount's local path"
    )
  if "://" in text and not is_remote(text):
    raise ConfigError(f"{what}={text}: unknown scheme; use a local path or gs://BUCKET/...")
  return epath.Path(text)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/parts...` as a string, for local paths and gs:// alike."""
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def absolute(p: str | os.PathLike, *, what: str = "path") -> str:
  """`p` made absolute (a local path against the working directory; a gs:// URL as it is), as a string."""
  return os.fspath(path(p, what=what)) if is_remote(p) else os.path.abspath(os.fspath(p))


def exists(p: str | os.PathLike, *, what: str = "path") -> bool:
  return path(p, what=what).exists()


def is_dir(p: str | os.PathLike, *, what: str = "path") -> bool:
  """Whether `p` is a directory; in a bucket, whether any object lies under the prefix `p/`."""
  return path(p, what=what).is_dir()


def names(p: str | os.PathLike, *, what: str = "path") -> list[str]:
  """The names directly under the directory `p` ([] if there is none); in a bucket, under the prefix `p/`."""
  if not is_remote(p):
    return os.listdir(p) if os.path.isdir(p) else []
  d = path(p, what=what)
  return [c.name for c in d.iterdir()] if d.is_dir() else []


def read_text(p: str | os.PathLike, *, what: str = "path") -> str | None:
  """The text of the file `p`, or None if there is none."""
  try:
    return path(p, what=what).read_text()
  except FileNotFoundError:
    return None


def write_bytes(p: str | os.PathLike, data: bytes, *, what: str = "path") -> None:
  """Writes the file `p` whole: locally through a temporary file and a rename (its folder created), in a bucket as
  one upload. Either way a reader, or a kill, never sees half of it."""
  if is_remote(p):
    path(p, what=what).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, "wb") as fh:
    fh.write(data)
  os.replace(tmp, p)


def write_text(p: str | os.PathLike, text: str, *, what: str = "path") -> None:
  write_bytes(p, text.encode(), what=what)


def mtime_ns(p: str | os.PathLike, *, what: str = "path") -> int:
  """The modification time of `p` in nanoseconds (in a bucket: the object's, at the resolution the store gives)."""
  if not is_remote(p):
    return os.stat(p).st_mtime_ns
  return int(path(p, what=what).stat().mtime * 1_000_000_000)


@contextlib.contextmanager
def writing(p: str | os.PathLike, *, binary: bool = False, what: str = "path") -> Iterator[io.IOBase]:
  """A file object whose content becomes the file `p` when the block ends without error (write_bytes): for writers
  that want a file handle (csv, json.dump, savefig), local and gs:// alike."""
  buf = io.BytesIO() if binary else io.StringIO(newline="")
  yield buf
  data = buf.getvalue()
  write_bytes(p, data if binary else data.encode(), what=what)
