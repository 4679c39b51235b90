"""JAX's multi-controller runtime: start-up, agreement checks, barriers, preemption, host-aware meshes."""
import hashlib
import json
import os

import jax
import numpy as np
from ml_collections import ConfigDict


def initialize() -> None:
  """Join the multi-process run if there is one; must run before anything touches the backend.

  Explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (what launch/local.sh sets).
  Implicit: SLURM with several tasks, or a multi-host TPU slice (jax detects both).
  """
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]),
                               initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "300")))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def config_hash(cfg: ConfigDict) -> str:
  from dispersion_jax import __version__
  text = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + __version__ + _code_fingerprint()
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _code_fingerprint() -> str:
  h = hashlib.sha256()
  root = os.path.dirname(__file__)
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      if f.endswith(".py"):
        with open(os.path.join(dirpath, f), "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()


def check_same_config(cfg: ConfigDict) -> None:
  """All processes must run the same config and code: compare a hash at start-up."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  from dispersion_jax.config import ConfigError
  mine = np.frombuffer(bytes.fromhex(config_hash(cfg)), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))
  bad = [i for i, h in enumerate(every) if not np.array_equal(h, mine)]
  if bad:
    raise ConfigError(f"process {jax.process_index()} and process(es) {bad} run different configs or code "
                      "versions; launch every process with the same command and checkout")


def preemption_requested(local_flag: bool, ckpt, step: int) -> bool:
  """True on every process at the same step once any of them was told to stop."""
  if jax.process_count() == 1:
    return local_flag
  return bool(ckpt.manager.reached_preemption(step)) or local_flag


def hybrid_device_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
  """Place `fsdp` and `tensor` inside a host (fast interconnect) and let only `data` span hosts."""
  from jax.experimental import mesh_utils
  per_host = jax.local_device_count()
  n_hosts = len(devices) // per_host
  data, fsdp, tensor = shape
  if data % n_hosts:
    raise ValueError(f"mesh.data={data} must be a multiple of the {n_hosts} hosts so that only data parallelism "
                     "crosses hosts")
  return mesh_utils.create_hybrid_device_mesh((data // n_hosts, fsdp, tensor), (n_hosts, 1, 1), devices,
                                              allow_split_physical_axes=True)
