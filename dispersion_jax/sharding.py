"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place parameters and batches on it."""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

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
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
)


def mesh_shape(cfg: ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes from cfg.mesh; one -1 takes all remaining devices."""
  from dispersion_jax.config import ConfigError
  sizes = {a: cfg.mesh[a] for a in AXES}
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
    raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present; "
                      "set one mesh.* size to -1")
  return sizes


def make_mesh(cfg: ConfigDict, devices: list | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if jax.process_count() > 1:
    from dispersion_jax.distributed import hybrid_device_mesh
    device_array = hybrid_device_mesh(shape, devices)
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
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, abstract_params,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
