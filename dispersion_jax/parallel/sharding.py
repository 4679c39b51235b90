"""The device mesh (data, fsdp, tensor), host-aware over several hosts, and the logical-axis rules that place
parameters and batches on it."""

import dataclasses
import math
import socket
import sys
import zlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dispersion_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
# MaxText-style rules: logical names used by the model -> mesh axes.
# Activations get their own names: the residual stream is sharded on batch only (params own `fsdp` on embed).
LOGICAL_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes of the (data, fsdp, tensor) mesh; one of them may be -1: all remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> dict[str, int]:
    """Axis sizes for `num_devices` devices, the -1 filled in."""
    sizes = {a: getattr(self, a) for a in AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
      raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    if any(s == 0 or s < -1 for s in sizes.values()):
      raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
      if num_devices % known:
        raise ConfigError(f"{num_devices} devices do not divide into mesh {sizes}; change mesh.* sizes")
      sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
      raise ConfigError(
          f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present; "
          "set one mesh.* size to -1"
      )
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None, granules: list[int] | None = None) -> Mesh:
  """The mesh over `devices` (default: all); `granules` (per device, its slice or host) makes it slice-aware
  without asking the processes (compile-only devices of a dry-run target have none to ask)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_cfg.shape(len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if granules is not None or jax.process_count() > 1:
    device_array = hybrid_device_mesh(shape, devices, granules)
  else:
    device_array = np.asarray(devices).reshape(shape)
  # Auto axis types: XLA's SPMD partitioner inserts the collectives (make_mesh now defaults to Explicit).
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Replicate dimensions whose size the mesh axes do not divide (tiny test models, odd vocab sizes)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if size > 1 and dim % size == 0 else None)
  return P(*out)


def param_shardings(logical_specs, abstract_params, mesh: Mesh):
  """NamedSharding per parameter from its logical PartitionSpec."""
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
      mesh_specs,
      abstract_params,
      is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------------
# Host-aware meshes: fast-interconnect groups ("granules") hold fsdp and tensor; only data parallelism crosses them.


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
  data, fsdp, tensor = shape
  dcn_data = math.gcd(data, n_granules)
  dcn_fsdp = n_granules // dcn_data
  if fsdp % dcn_fsdp:
    raise ConfigError(
        f"mesh data={data} x fsdp={fsdp} cannot be split over {n_granules} hosts/slices with tensor "
        f"({tensor}) inside each: make mesh.data a multiple of {n_granules}"
    )
  return (data // dcn_data, fsdp // dcn_fsdp, tensor), (dcn_data, dcn_fsdp, 1)


def _group_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
  from jax.experimental import mesh_utils

  if devices[0].platform == "tpu":  # follow the physical ICI torus
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
    raise ConfigError(f"hosts/slices have different device counts {sorted(sizes)}; use the same number on each")
  ici, dcn = dcn_split(shape, len(groups))
  if dcn[1] > 1 and jax.process_index() == 0:
    print(
        f"mesh: fsdp crosses hosts ({dcn[1]} ways) because mesh.data={shape[0]} is not a multiple of the "
        f"{len(groups)} hosts; change it to keep FSDP traffic inside a host",
        file=sys.stderr,
    )
  blocks = np.empty(dcn, dtype=object)
  for i, group in enumerate(groups.values()):
    blocks[np.unravel_index(i, dcn)] = _group_mesh(ici, group)
  return np.block(blocks.tolist())
