"""A run's line history (metrics.jsonl) on a local disk or in a bucket, without ever appending to an object.

Appending to a gs:// object silently replaces it (../shared/docs/object-storage.md), so a bucket holds the history
as rolled chunk objects, `DIR/g{generation}-{chunk}.jsonl`: each new line rewrites the current chunk (one small
upload, so a crash loses nothing already written), and a chunk rolls over after CHUNK_LINES lines. Rewriting the
history (a resume drops the rows logged after its checkpoint) writes a new generation whose chunk 0 holds the kept
lines, then deletes the older generations; readers take the highest generation that has its chunk 0. An object
upload is atomic, so a kill at any moment leaves either the old history or the new one.

Local paths keep one file appended line by line (flushed per line) and rewritten through a temporary file and
os.replace, exactly as before.

A bucket write that still fails after gcsfs's retries (6 tries, about 35 s of back-off for a 503) is a
StorageUnavailableError: one line and exit 75 at the command line, as a checkpoint save the storage does not
complete (the run resumes from its last checkpoint, and the history is rewound to it).
"""

import contextlib
import os
import re

from dispersion_jax.errors import StorageUnavailableError, clean_message
from dispersion_jax.storage import paths

CHUNK_LINES = 64
_CHUNK = re.compile(r"^g(\d{6})-(\d{6})\.jsonl$")


def location(workdir: str | os.PathLike, name: str) -> str:
  """Where the history `name` (e.g. metrics.jsonl) of a run lives: the file itself on a local disk, the folder
  `name.d` of its chunk objects in a bucket."""
  return paths.join(workdir, name + ".d" if paths.is_remote(workdir) else name)


class LineLog:
  """Read, rewrite and append whole lines of one history (`location`)."""

  def __init__(self, where: str | os.PathLike):
    self.where = paths.path(where)
    self.remote = paths.is_remote(where)
    self._fh = None
    self._gen, self._seq, self._chunk = 0, 0, []  # bucket: the chunk being written and its lines

  # ------------------------------------------------------------------------------------------- reading
  def read_lines(self) -> list[str]:
    """Every line (with its newline, if it was written whole) in order; [] if there is no history."""
    if not self.remote:
      if not os.path.isfile(self.where):
        return []
      with open(self.where) as fh:
        return fh.readlines()
    gen, chunks = self._current()
    lines = []
    for seq in sorted(chunks):
      lines += (self.where / _name(gen, seq)).read_text().splitlines(keepends=True)
    return lines

  def exists(self) -> bool:
    return os.path.isfile(self.where) if not self.remote else bool(self._current()[1])

  def _current(self) -> tuple[int, dict[int, str]]:
    """(the highest complete generation, its chunk numbers) of a bucket history."""
    found: dict[int, set[int]] = {}
    if self.where.exists():
      for p in self.where.iterdir():
        m = _CHUNK.match(p.name)
        if m:
          found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    complete = [g for g, seqs in found.items() if 0 in seqs]
    if not complete:
      return 0, {}
    gen = max(complete)
    return gen, {s: _name(gen, s) for s in found[gen]}

  # ------------------------------------------------------------------------------------------- writing
  def replace(self, lines: list[str]) -> None:
    """The history becomes `lines` (each ending in a newline), atomically."""
    self.close()
    if not self.remote:
      tmp = f"{self.where}.tmp{os.getpid()}"
      with open(tmp, "w") as fh:
        fh.writelines(lines)
      os.replace(tmp, self.where)
      return
    with self._storage("rewriting"):
      old = [p for p in self.where.iterdir() if _CHUNK.match(p.name)] if self.where.exists() else []
      gen = max((int(_CHUNK.match(p.name).group(1)) for p in old), default=-1) + 1
      (self.where / _name(gen, 0)).write_text("".join(lines))  # the new generation exists from here on
      for p in old:
        p.unlink(missing_ok=True)
    self._gen, self._seq, self._chunk = gen, 1, []

  def open_for_append(self) -> None:
    if not self.remote:
      self.where.parent.mkdir(parents=True, exist_ok=True)
      self._fh = open(self.where, "a", buffering=1)
      return
    gen, chunks = self._current()
    self._gen, self._seq, self._chunk = gen, (max(chunks) + 1 if chunks else 0), []

  def append(self, line: str) -> None:
    """Adds one line (ending in a newline); it is stored when this returns."""
    if not self.remote:
      self._fh.write(line)
      return
    self._chunk.append(line)
    with self._storage("writing"):
      (self.where / _name(self._gen, self._seq)).write_text("".join(self._chunk))
    if len(self._chunk) >= CHUNK_LINES:
      self._seq, self._chunk = self._seq + 1, []

  @contextlib.contextmanager
  def _storage(self, doing: str):
    """A bucket write that failed after the storage library's own retries: one line (StorageUnavailableError)."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError, OSError, ...; the user needs one line
      text = " ".join(clean_message(str(e)).split())[:200]
      raise StorageUnavailableError(
          f"{doing} the history {self.where} failed ({type(e).__name__}: {text}): the storage does not answer; "
          "re-run the same command once it works again (the run resumes from its last complete checkpoint)"
      ) from e

  def close(self) -> None:
    if self._fh is not None:
      self._fh.close()
      self._fh = None


def _name(gen: int, seq: int) -> str:
  return f"g{gen:06d}-{seq:06d}.jsonl"
