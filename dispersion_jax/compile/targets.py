"""Compile targets of the dry run: Cloud TPU slices and NVIDIA nodes as compile-only devices, on any machine.

`--config.dry_run_target=NAME` names the hardware as its users book it:
- TPU slices as Cloud TPU spells them. The number counts TensorCores for v4 and v5p (two per chip, one "megacore"
  device each: `v5p-8` = 4 chips, topology `v5:2x2x1`) and chips for v5e and v6e (`v5e-8` = 8 chips, `v5e:2x4`).
  Shapes, hosts (4 chips each, 1 for a single-chip slice) and wrap-around links follow MaxText's table
  (src/maxtext/utils/accelerator_to_spec_map.py), generated here by rule; tests check the rule against it.
  `dry_run_slices=N` makes N such slices joined by DCN (multi-slice).
- NVIDIA nodes: `h100-8`, `h200-8` (one node of 8 SXM GPUs), `h100-8x4` (4 nodes); also `h100-1/2/4`.
  Devices come from XLA's GPU target specs (gpu_specs/*.txtpb), each node one process, as a launch would have.

The devices come from `jax.experimental.topologies.get_topology_desc` (libtpu for TPUs, the CUDA PJRT plugin for
GPUs: the `compile` extra). Nothing here runs on them; jit(...).lower(...).compile() targets them.
"""

import dataclasses
import importlib.resources
import math
import os
import re

from dispersion_jax.compile import chips
from dispersion_jax.errors import ConfigError

_TPU_CHIP_CONFIG = {"v4": "megacore_dense", "v5p": "megacore", "v5e": "default", "v6e": "default"}
_TPU_TOPOLOGY_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
_GPU_SPEC = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}  # v4 / v5p chips below a full 4x4x4 cube
_EXAMPLES = "v5e-8, v5p-8, v4-8, v6e-256, h100-8, h200-8, h100-8x4"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as the user wrote it
  chip: str  # key of chips.CHIPS
  platform: str  # the backend name code compares with: "tpu" or "gpu"
  topology: str  # "v5e:2x4", or nodes x hosts x GPUs for NVIDIA ("4x1x8")
  chips_per_slice: int
  slices: int = 1
  chip_config: str = ""
  host_bounds: tuple[int, int, int] = (1, 1, 1)
  wrap: tuple[bool, bool, bool] = (False, False, False)

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.slices


def _two_d(n: int) -> tuple[int, int]:
  a = 2 ** (int(math.log2(n)) // 2)
  return a, n // a


def _three_d(n: int) -> tuple[int, int, int]:
  """A full-torus v4/v5p shape: dimensions multiples of 4, the longest as short as possible, then the shortest as
  long as possible (MaxText's table: 4x4x8, 4x8x12, 8x8x16, 8x16x44, ...)."""
  if n in _SMALL_3D:
    return _SMALL_3D[n]
  m = n // 64
  shapes = [(a, b, m // (a * b)) for a in range(1, m + 1) for b in range(a, m + 1) if m % (a * b) == 0]
  a, b, c = min((s for s in shapes if s[1] <= s[2]), key=lambda s: (s[2], -s[0]))
  return 4 * a, 4 * b, 4 * c


def _tpu(name: str, family: str, count: int, slices: int) -> Target:
  per_chip = 2 if family in ("v4", "v5p") else 1  # v4 / v5p names count TensorCores
  n = count // per_chip
  if family in ("v5e", "v6e"):
    if n not in (1, 4, 8, 16, 32, 64, 128, 256):
      raise ConfigError(f"dry_run_target={name}: {family} slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips")
    shape = _two_d(n)
    wrap = (shape[0] == 16, shape[1] == 16, False)  # wrap-around links only along a full 16-chip side
  else:
    if count % (2 * per_chip) or (n not in _SMALL_3D and n % 64):
      raise ConfigError(
          f"dry_run_target={name}: {family} names count TensorCores (2 per chip): use {family}-8, -16, -32, -64, or "
          "a multiple of 128"
      )
    shape = _three_d(n)
    wrap = (n >= 64,) * 3
  return Target(
      name=name,
      chip=family,
      platform="tpu",
      topology=f"{_TPU_TOPOLOGY_PREFIX[family]}:{'x'.join(map(str, shape))}",
      chips_per_slice=n,
      slices=slices,
      chip_config=_TPU_CHIP_CONFIG[family],
      host_bounds=(1, 1, 1) if n == 1 else (2, 2, 1),
      wrap=wrap,
  )


def parse(name: str, slices: int = 1) -> Target:
  """The target a name stands for; ConfigError (one line) for a name this table does not know."""
  if slices < 1:
    raise ConfigError(f"dry_run_slices={slices} must be >= 1")
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if m:
    return _tpu(name, m.group(1), int(m.group(2)), slices)
  m = re.fullmatch(r"(h100|h200)-(\d+)(?:x(\d+))?", name)
  if m:
    gpus, nodes = int(m.group(2)), int(m.group(3) or 1)
    if gpus not in (1, 2, 4, 8) or (nodes > 1 and gpus != 8):
      raise ConfigError(f"dry_run_target={name}: a node has 1, 2, 4 or 8 GPUs; several nodes are 8 each (h100-8x4)")
    if slices != 1:
      raise ConfigError(f"dry_run_slices={slices} is for TPUs; name GPU nodes as {m.group(1)}-8x{slices}")
    return Target(name, m.group(1), "gpu", f"{nodes}x1x{gpus}", gpus, slices=nodes)
  raise ConfigError(f"dry_run_target={name!r} is not a known target; use e.g. {_EXAMPLES}")


def _quiet_libtpu(target: Target) -> None:
  """libtpu looks for the TPU VM it runs on (metadata server, worker list) and warns when it finds none, and
  locks /tmp/libtpu_lockfile against a second process using the chips; a compile-only process has no VM to find
  and no chip to share (parallel test workers, several dry runs at once)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.chip}-{target.chips_per_slice}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices(target: Target) -> list:
  """Compile-only devices of the target (all slices / nodes); ConfigError naming the extra when it is absent."""
  from jax.experimental import topologies  # noqa: PLC0415 - jax's backend is touched only when compiling

  try:
    if target.platform == "tpu":
      _quiet_libtpu(target)
      return list(
          topologies.get_topology_desc(
              platform="tpu",
              topology_name=target.topology,
              chip_config_name=target.chip_config,
              chips_per_host_bounds=target.host_bounds,
              num_slices=target.slices,
              wrap=target.wrap,
          ).devices
      )
    spec = importlib.resources.files("dispersion_jax.compile").joinpath("gpu_specs", _GPU_SPEC[target.chip]).read_text()
    return list(topologies.get_topology_desc(platform="cuda", target_config=spec, topology=target.topology).devices)
  except (RuntimeError, NotImplementedError) as e:
    if "not installed" in str(e) or "not implemented" in str(e) or isinstance(e, NotImplementedError):
      kind = "libtpu" if target.platform == "tpu" else "the CUDA PJRT plugin"
      raise ConfigError(
          f"dry_run_target={target.name} needs {kind}: pip install -e '.[compile]' (see README, set-up)"
      ) from None
    raise


def granules(target: Target, devs: list) -> list[int]:
  """Per device, its fast-interconnect group: the slice (ICI) on TPUs, the node (NVLink) on GPUs; only data
  parallelism should cross groups (DCN / InfiniBand)."""
  if target.platform == "tpu":
    return [getattr(d, "slice_index", 0) or 0 for d in devs]
  return [d.process_index for d in devs]


def chip(target: Target) -> chips.Chip:
  return chips.CHIPS[target.chip]
