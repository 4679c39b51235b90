"""JAX's multi-controller runtime: start-up, agreement checks, barriers, preemption, data shards, host-aware meshes.

Every process runs the same program on its own devices; `jax.distributed.initialize` joins them into one set of
global devices. It must run before anything touches the backend (device lists, arrays, jit).
"""
import dataclasses
import hashlib
import json
import math
import os
import socket
import sys
import zlib

import jax
import numpy as np
from ml_collections import ConfigDict

_FLAGS = ("--coordinator", "--num_processes", "--process_id")


@dataclasses.dataclass
class Launch:
  """How this process joins the run (None = take it from the environment or cluster auto-detection)."""
  coordinator: str | None = None      # host:port of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None


def pop_cli_flags(argv: list[str]) -> tuple[list[str], Launch]:
  """Strip `--coordinator ADDR --num_processes N --process_id I` (or `--flag=value`) from argv."""
  from dispersion_jax.config import ConfigError
  rest, found, args = [], {}, list(argv)
  while args:
    a = args.pop(0)
    name, eq, val = a.partition("=")
    if name not in _FLAGS:
      rest.append(a)
      continue
    if not eq:
      if not args:
        raise ConfigError(f"{name} needs a value")
      val = args.pop(0)
    found[name[2:]] = val
  try:
    launch = Launch(found.get("coordinator"),
                    *(int(found[k]) if k in found else None for k in ("num_processes", "process_id")))
  except ValueError:
    raise ConfigError("--num_processes and --process_id take integers") from None
  return rest, launch


def _env_int(name: str, default: int) -> int:
  return int(os.environ.get(name, default))


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM (no backend needed); jax then finds the slice's workers from the VM metadata."""
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:   # GKE
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
  slurm = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) and \
      int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
  if not (explicit or slurm or _on_tpu_vm()):
    return False
  if explicit and num == 1:
    return False                      # a one-process "cluster" is a plain run
  if _backend_started():
    raise RuntimeError("jax.distributed.initialize must run before anything touches the JAX backend (devices, "
                       "arrays, jit); call distributed.initialize() first in main()")
  # Gloo for cross-process collectives on CPU (jax's default; set explicitly so CPU tests do not depend on it).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = _env_int("DISPERSION_HEARTBEAT_TIMEOUT_S", 100)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                             initialization_timeout=_env_int("DISPERSION_INIT_TIMEOUT_S", 300),
                             heartbeat_timeout_seconds=heartbeat,
                             shutdown_timeout_seconds=_env_int("DISPERSION_SHUTDOWN_TIMEOUT_S", 300))
  print(f"distributed: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
        f"{jax.device_count()} devices here; if a process dies the others stop within ~{heartbeat} s (re-run the "
        "same command to resume from the last checkpoint)", file=sys.stderr, flush=True)
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


def config_hash(cfg: ConfigDict) -> str:
  from dispersion_jax import __version__
  text = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + __version__ + _code_fingerprint()
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _code_fingerprint() -> str:
  h = hashlib.sha256()
  root = os.path.dirname(__file__)
  for dirpath, dirs, files in os.walk(root):
    dirs.sort()                       # a stable walk order on every host
    for f in sorted(files):
      if f.endswith(".py"):
        with open(os.path.join(dirpath, f), "rb") as fh:
          h.update(fh.read())
  return h.hexdigest()


def check_same_config(cfg: ConfigDict) -> None:
  """All processes must run the same config and code: compare a hash at start-up (ConfigError on every process)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  from dispersion_jax.config import ConfigError
  mine = config_hash(cfg)
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8)))
  hashes = [bytes(h).hex() for h in every]
  groups = {h: [i for i, x in enumerate(hashes) if x == h] for h in dict.fromkeys(hashes)}
  if len(groups) > 1:
    detail = "; ".join(f"processes {ids} have {h}" for h, ids in groups.items())
    raise ConfigError(f"processes run different configs or code versions (config+code hash: {detail}); launch "
                      "every process with the same command line and the same checkout")


def preemption_requested(local_flag: bool, ckpt, step: int) -> bool:
  """True on every process at the same step once any of them was told to stop.

  Multi-process: jax's preemption service catches SIGTERM on each process and agrees on a common step (so train.py
  must not install its own SIGTERM handler there); Orbax asks it at every step. `local_flag` must then be the same
  on every process (e.g. a fixed stop step).
  """
  if jax.process_count() == 1:
    return local_flag
  return bool(ckpt.manager.reached_preemption(step)) or local_flag


# ---------------------------------------------------------------------------------------------------------------
# Data: which document shards this process reads.

def local_data_shards(batch_sharding, global_batch: int, num_shards: int = 0) -> tuple[int, list[int]]:
  """(number of document shards, the ones this process reads, in the order of its rows of the global batch).

  Global batch rows [s*R, (s+1)*R), R = global_batch / num_shards, always come from shard s, whatever the number of
  processes: with a fixed `data.shards` the data order does not depend on how many processes read it.
  `num_shards=0` = one per process (each reads one slice of the documents).
  """
  from dispersion_jax.config import ConfigError
  rows = sorted({r for idx in batch_sharding.addressable_devices_indices_map((global_batch,)).values()
                 for r in range(*idx[0].indices(global_batch))})
  n = num_shards or jax.process_count()
  if global_batch % n:
    raise ConfigError(f"data.shards={n} must divide the batch ({global_batch} rows)")
  per = global_batch // n
  shards = sorted({r // per for r in rows})
  if len(shards) * per != len(rows):
    raise ConfigError(f"data.shards={n} does not match how the mesh places batch rows on this process's devices; "
                      f"use a multiple of the process count ({jax.process_count()}) that divides the batch")
  return n, shards


def process_iterator(cfg: ConfigDict, split: str, batch_sharding, global_batch: int, **kw):
  """A checkpointable Grain iterator of this process's rows of each global batch (reads only its shards)."""
  import grain
  from dispersion_jax.data import pipeline
  n, shards = local_data_shards(batch_sharding, global_batch, cfg.data.get("shards", 0))
  per = global_batch // n
  if len(shards) == 1:
    return pipeline.make_iterator(cfg, split, batch_size=per, process_index=shards[0], process_count=n, **kw)
  parts = [pipeline.make_dataset(cfg, split, batch_size=per, process_index=s, process_count=n, **kw) for s in shards]
  joined = grain.experimental.ZipIterDataset(parts, strict=False)
  return iter(joined.map(lambda bs: {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}))


# ---------------------------------------------------------------------------------------------------------------
# Mesh: fast-interconnect groups ("granules") hold fsdp and tensor; only data parallelism crosses them.

def _process_hosts() -> list[int]:
  """Per process index: an id of its host (processes that share a machine share NVLink / PCIe)."""
  from jax.experimental import multihost_utils
  mine = np.uint32(zlib.crc32(socket.gethostname().encode()))
  return [int(h) for h in np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)]


def granule_ids(devices: list) -> list[int]:
  """Per device, its fast-interconnect group: the TPU slice (ICI spans a slice's hosts), the GPU host (one process
  per node or per GPU alike), or the process on CPU (where processes stand in for hosts)."""
  platform = devices[0].platform
  if platform == "tpu":
    return [getattr(d, "slice_index", 0) for d in devices]
  if platform in ("gpu", "cuda", "rocm"):
    hosts = _process_hosts()
    return [hosts[d.process_index] for d in devices]
  return [d.process_index for d in devices]


def dcn_split(shape: tuple[int, int, int], n_granules: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(ici shape, dcn shape) with ici * dcn = shape: granules go to `data` first, then to `fsdp`, never to `tensor`."""
  from dispersion_jax.config import ConfigError
  data, fsdp, tensor = shape
  dcn_data = math.gcd(data, n_granules)
  dcn_fsdp = n_granules // dcn_data
  if fsdp % dcn_fsdp:
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} cannot be split over {n_granules} hosts/slices with tensor "
                     f"({tensor}) inside each: make mesh.data a multiple of {n_granules}")
  return (data // dcn_data, fsdp // dcn_fsdp, tensor), (dcn_data, dcn_fsdp, 1)


def _group_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
  from jax.experimental import mesh_utils
  if devices[0].platform == "tpu":      # follow the physical ICI torus
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return np.asarray(devices, dtype=object).reshape(shape)


def hybrid_device_mesh(shape: tuple[int, int, int], devices: list, granules: list[int] | None = None) -> np.ndarray:
  """Device array for (data, fsdp, tensor) over several hosts/slices: fsdp and tensor inside a host (fast
  interconnect), data parallelism (and, only if data is too small, part of fsdp) across hosts."""
  granules = granule_ids(devices) if granules is None else granules
  groups: dict[int, list] = {}
  for d, g in sorted(zip(devices, granules), key=lambda dg: (dg[0].process_index, dg[0].id)):
    groups.setdefault(g, []).append(d)  # in process order: process 0's devices come first
  if len(groups) == 1:
    return _group_mesh(shape, devices)
  sizes = {len(g) for g in groups.values()}
  if len(sizes) > 1:
    from dispersion_jax.config import ConfigError
    raise ConfigError(f"hosts/slices have different device counts {sorted(sizes)}; use the same number on each")
  ici, dcn = dcn_split(shape, len(groups))
  if dcn[1] > 1 and jax.process_index() == 0:
    print(f"mesh: fsdp crosses hosts ({dcn[1]} ways) because mesh.data={shape[0]} is not a multiple of the "
          f"{len(groups)} hosts; change it to keep FSDP traffic inside a host", file=sys.stderr)
  blocks = np.empty(dcn, dtype=object)
  for i, group in enumerate(groups.values()):
    blocks[np.unravel_index(i, dcn)] = _group_mesh(ici, group)
  return np.block(blocks.tolist())
