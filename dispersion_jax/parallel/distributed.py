"""JAX's multi-controller runtime: start-up, agreement checks, barriers, preemption.

Every process runs the same program on its own devices; `jax.distributed.initialize` joins them into one set of
global devices. It must run before anything touches the backend (device lists, arrays, jit).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading

import jax
import numpy as np

from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import paths


@dataclasses.dataclass
class Launch:
  """How this process joins the run (None = take it from the environment or cluster auto-detection)."""

  coordinator: str | None = None  # host:port of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None


def _env_int(name: str, default: int) -> int:
  return int(os.environ.get(name, default))


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM (no backend needed); jax then finds the slice's workers from the VM metadata."""
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:  # GKE
    return True
  try:
    from jax._src import cloud_tpu_init  # private, hence the guard; set by `import jax` (libtpu + TPU chips)

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False


def initialize(launch: Launch | None = None) -> bool:
  """Join the multi-process run if there is one; returns True if it did. Call before anything touches the backend.

  Explicit: --coordinator/--num_processes/--process_id flags, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID (what launch/local.sh sets). Implicit: SLURM with several tasks, or a Cloud TPU VM (jax reads both).
  Timeouts (seconds, env): DISPERSION_INIT_TIMEOUT_S (all processes must connect), DISPERSION_HEARTBEAT_TIMEOUT_S
  (a silent process is declared dead and every other one exits), DISPERSION_SHUTDOWN_TIMEOUT_S.
  """
  launch = launch or Launch()
  env = os.environ
  coordinator = launch.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
  num = launch.num_processes if launch.num_processes is not None else _opt_int(env.get("JAX_NUM_PROCESSES"))
  pid = launch.process_id if launch.process_id is not None else _opt_int(env.get("JAX_PROCESS_ID"))
  explicit = coordinator is not None or num is not None or pid is not None
  # Inside an `srun` step of several tasks (the variables jax's SLURM detection reads).
  slurm = (
      all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
      and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
  )
  if not (explicit or slurm or _on_tpu_vm()):
    return False
  if explicit and num == 1:
    return False  # a one-process "cluster" is a plain run
  if _backend_started():
    raise RuntimeError(
        "jax.distributed.initialize must run before anything touches the JAX backend (devices, "
        "arrays, jit); call distributed.initialize() first in main()"
    )
  # Gloo for cross-process collectives on CPU (jax's default; set explicitly so CPU tests do not depend on it).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = _env_int("DISPERSION_HEARTBEAT_TIMEOUT_S", 100)
  jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num,
      process_id=pid,
      initialization_timeout=_env_int("DISPERSION_INIT_TIMEOUT_S", 300),
      heartbeat_timeout_seconds=heartbeat,
      shutdown_timeout_seconds=_env_int("DISPERSION_SHUTDOWN_TIMEOUT_S", 300),
  )
  print(
      f"distributed: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
      f"{jax.device_count()} devices here; if a process dies the others stop within ~{heartbeat} s (re-run the "
      "same command to resume from the last checkpoint)",
      file=sys.stderr,
      flush=True,
  )
  return True


def _opt_int(text: str | None) -> int | None:
  return None if text in (None, "") else int(text)


def exit_now(code: int) -> None:
  """Exit with `code`. Multi-process: skip the polite shutdown barrier (it would wait for peers that are still
  computing); the peers see this process stop and exit within the heartbeat timeout."""
  if not jax.distributed.is_initialized():
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def config_hash(cfg: dict) -> str:
  """A hash of the run config (a plain dict) and of the package's code (its version included)."""
  text = json.dumps(cfg, sort_keys=True, default=str) + _code_fingerprint()
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _code_fingerprint() -> str:
  h = hashlib.sha256()
  root = os.path.dirname(__file__)
  for dirpath, dirs, files in os.walk(root):
    dirs.sort()  # a stable walk order on every host
    for f in sorted(files):
      if f.endswith(".py"):
        with open(os.path.join(dirpath, f), "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()


def check_same_config(cfg: dict) -> None:
  """All processes must run the same config and code: compare a hash at start-up (ConfigError on every process)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = config_hash(cfg)
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8)))
  hashes = [bytes(h).hex() for h in every]
  groups = {h: [i for i, x in enumerate(hashes) if x == h] for h in dict.fromkeys(hashes)}
  if len(groups) > 1:
    detail = "; ".join(f"processes {ids} have {h}" for h, ids in groups.items())
    raise ConfigError(
        f"processes run different configs or code versions (config+code hash: {detail}); launch "
        "every process with the same command line and the same checkout"
    )


def check_shared_workdir(workdir: str) -> None:
  """Every process must see one work directory: Orbax's multi-process save writes one checkpoint from all of them,
  and when each host has its own local directory it hangs (../shared/docs/object-storage.md). Process 0 writes a
  per-run token file there and every process looks for it; a process that does not see it makes every process
  stop with the same one-line ConfigError, before the first save and within seconds."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  lead = jax.process_index() == 0
  token = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(16), np.uint8)))
  root = paths.path(workdir, what="--workdir")
  probe = root.joinpath(f".shared-workdir-check-{bytes(token).hex()}")
  created = lead and not root.exists()
  if lead:
    root.mkdir(parents=True, exist_ok=True)
    probe.write_text("written by process 0 to check that every process sees this work directory\n")
  barrier("shared_workdir_written")
  seen = np.asarray(multihost_utils.process_allgather(np.array([probe.exists()], np.uint8))).reshape(-1)
  barrier("shared_workdir_read")
  if lead:
    probe.unlink(missing_ok=True)
  blind = [i for i, ok in enumerate(seen) if not ok]
  if blind:
    if created and not paths.is_remote(workdir):
      shutil.rmtree(os.fspath(root), ignore_errors=True)  # a run that fails to start leaves no workdir behind
    raise ConfigError(
        f"--workdir={workdir} is not the same directory on every process (processes {blind} do not see the file "
        "process 0 wrote there: each host has its own disk); use a gs://BUCKET/... workdir or a directory every "
        "host mounts (NFS, gcsfuse)"
    )


class Preemption:
  """SIGTERM (a preemption) or Ctrl-C sets a flag; the loop saves a checkpoint at the next step boundary and stops,
  and the command exits with code 75 (cli/common.py). A second Ctrl-C stops at once (KeyboardInterrupt, the last
  checkpoint is kept). Install it first in a run (`with Preemption() as p:`), so that a SIGTERM during set-up still
  ends in a clean save and exit; leaving the block restores the previous handlers."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signals reach the main thread only: a run in another thread stops by its stop_at
    # Multi-process: jax's preemption service owns SIGTERM (see below); Ctrl-C stops that process only.
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    if signum == signal.SIGINT:
      print(
          "\nstopping after this step: saving a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True
      )
    self.requested = True

  def __enter__(self) -> "Preemption":
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one installed outside Python
    self._previous = {}


def preemption_requested(local_flag: bool, ckpt, step: int) -> bool:
  """True on every process at the same step once any of them was told to stop.

  Multi-process: jax's preemption service catches SIGTERM on each process and agrees on a common step (so train.py
  must not install its own SIGTERM handler there); Orbax asks it at every step. `local_flag` must then be the same
  on every process (e.g. a fixed stop step).
  """
  if jax.process_count() == 1:
    return local_flag
  return bool(ckpt.manager.reached_preemption(step)) or local_flag
