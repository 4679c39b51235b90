"""Quiet starts on machines without accelerators when the accelerator compilers (the `compile` extra) are
installed. Imports nothing but the standard library: the package's __init__ uses it before jax is imported.

The CUDA plugin's extensions, loaded by `import jax` and again when the backend starts, write "Could not find cuda
drivers" notes (absl, before logging is set up) straight to file descriptor 2 when there is no driver; they say
nothing about a CPU run or a compile for a target, so they are dropped there, and only there.
"""

import contextlib
import glob
import os
import sys
import tempfile

# Device files an accelerator runtime needs: NVIDIA's driver, Cloud TPU VMs (/dev/accel*, /dev/vfio/* on v5+).
_ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/accel*", "/dev/vfio/[0-9]*")
_PLUGIN_NOTES = ("cudart_stub.cc", "All log messages before absl::InitializeLog()")


def has_accelerator() -> bool:
  return any(glob.glob(p) for p in _ACCELERATOR_FILES)


@contextlib.contextmanager
def without_plugin_notes():
  """Within, on a machine without accelerators: what C++ writes to file descriptor 2 is held back and passed on
  at the end, less the CUDA plugin's no-driver notes. Elsewhere (or with no usable fd 2): nothing changes."""
  try:
    saved = -1 if has_accelerator() else os.dup(2)
  except OSError:
    saved = -1
  if saved < 0:
    yield
    return
  sys.stderr.flush()
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not any(n in line for n in _PLUGIN_NOTES)))
      sys.stderr.flush()
