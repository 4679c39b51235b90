"""Which backend the code is built for: the machine's own, or a compile target's (the dry run for a TPU pod or a
GPU node on a CPU machine). Every default that depends on the backend (bf16 compute, cuDNN attention, the
dispersion kernel) asks `current()`, so a dry run for a target resolves them as a run on the target would.

Also keeps a plain CPU run quiet when the accelerator compilers (the `compile` extra: libtpu, the CUDA plugin) are
installed: on a machine with no accelerator device files they can only fail, noisily (TPU metadata queries,
driver-not-found notes), so the CPU is pinned before the backend starts.
"""

import contextlib
import contextvars
import os

import jax

from dispersion_jax.parallel.quiet import has_accelerator, without_plugin_notes

_TARGET = contextvars.ContextVar("dispersion_target_backend", default=None)


def current() -> str:
  """The backend being compiled for: "cpu", "gpu" or "tpu"."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within: `current()` is `platform` (a compile target), whatever the machine runs."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def prefer_cpu_without_accelerator() -> None:
  """On a machine without accelerators, and unless JAX_PLATFORMS says otherwise: the CPU backend only, and no TPU
  metadata-server query. Call before anything starts the backend; a no-op afterwards."""
  from jax._src import xla_bridge  # noqa: PLC0415 - private; guarded like distributed._backend_started

  try:
    started = xla_bridge.backends_are_initialized()
  except AttributeError:
    started = True
  if started or jax.config.jax_platforms or has_accelerator():
    return
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def start() -> None:
  """Start the backend (after distributed.initialize) without the CUDA plugin's no-driver notes on a machine
  without a GPU (the plugin loads with the backend even when only the CPU is used)."""
  with without_plugin_notes():
    jax.devices()
