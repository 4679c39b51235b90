"""LoRA for both model families: adapters chosen by a regex over parameter paths, trained while the base is frozen.

A target is a block's dense kernel W [in, out] (scanned: [layers, in, out]); its adapter is A [in, r] and
B [r, out] (scanned: a leading layer axis on both), A ~ PEFT's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0,
so step 0 is the base model exactly. The model computes `x @ W + dropout(x) @ A @ (B * alpha / r)` in each target
layer (models/lora_dense.py), i.e. PEFT's `lora.Linear`; `merge` gives the equivalent weights
`W + A @ B * alpha / r` for export and evaluation. The train step differentiates the adapters only: the base
weights are a plain (non-differentiated) argument of the loss, so they have no gradient buffers and no optimizer
state, and may be held in bf16 (`model.param_dtype`).

Why not qwix (0.1.8, what MaxText uses) and why not merge the weights in the loss:
- qwix intercepts linen's dot_general / einsum / Module.param: it fails at `init` on a linen module that
  `jnp.einsum`s its own parameter (`SetAttributeFrozenModuleError`; both our models' tied output heads do) and it
  does not freeze the base for linen; working around both costs more than these few lines.
- Forming `W + A @ B * alpha / r` for the whole tree inside the loss (the plain parameter-tree form) materialises a
  second copy of every target weight and, in the backward pass, a full-size gradient of it (under nn.scan the
  stacked merged weights are an input of the layer loop, so neither can be fused away): for Qwen3-8B's 6.9B
  adapted weights about 2 x 13 GiB in bf16. It also cannot express PEFT's dropout on the adapter's input. Applying the adapter in
  the layer keeps the per-step extra to two rank-r matmuls, and works unchanged under nn.scan (the `lora`
  collection is sliced on the layer axis like `params`) and remat.
The adapters are sharded like their base weight: A along W's input axis, B along W's output axis (rank
replicated), by the same logical rules (sharding.py).
"""

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from dispersion_jax import models

_LORA_STREAM = 0x6C6F7261  # fold_in constant of the adapters' initialisation ("lora")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # r; 0 = off (full fine-tuning), unless init_from is set (then the adapter's r)
  alpha: float | None = None  # scale alpha / r; None = the adapter's (init_from) or alpha = r
  dropout: float | None = None  # on the adapter's input, training steps only; None = the adapter's or 0
  targets: str | None = None  # regex over parameter paths (e.g. "h_0/attn/c_attn/kernel"); None = the family's
  init_from: str | None = None  # a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 = off)")
    if self.alpha is not None and self.alpha <= 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if self.dropout is not None and not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
    if self.targets is not None:
      try:
        re.compile(self.targets)
      except re.error as e:
        raise ValueError(f"lora.targets={self.targets!r} is not a regular expression ({e})") from None

  @property
  def enabled(self) -> bool:
    return self.rank > 0 or self.init_from is not None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """A resolved LoRA setting: what the train step, checkpoints and PEFT files need."""

  rank: int
  alpha: float
  dropout: float
  targets: tuple[tuple[str, ...], ...]  # flattened paths of the adapted kernels (their module paths)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _path(p: tuple[str, ...]) -> str:
  return "/".join(p)


def _in_block(p: tuple[str, ...]) -> bool:
  return p[0] == "h" or re.fullmatch(r"h_\d+", p[0]) is not None


def select_targets(model_cfg, abstract_params, pattern: str | None) -> tuple[tuple[str, ...], ...]:
  """The module paths of the dense kernels whose paths the regex matches (re.search over "h_0/attn/c_attn/kernel";
  other tensors are never adapted, so "c_attn" is enough). ValueError (one line) if it matches no kernel, or one
  outside the blocks (a head)."""
  pattern = models.family(model_cfg).LORA_TARGETS if pattern is None else pattern
  kernels = [p for p in traverse_util.flatten_dict(abstract_params) if p[-1] == "kernel"]
  hits = [p for p in kernels if re.search(pattern, _path(p))]
  if not hits:
    example = _path(next(p for p in kernels if _in_block(p)))
    raise ValueError(f"lora.targets={pattern!r} matches no dense kernel (their paths look like {example!r})")
  bad = [p for p in hits if not _in_block(p)]
  if bad:
    raise ValueError(f"lora.targets={pattern!r} matches {_path(bad[0])!r}: only the blocks' dense layers take adapters")
  return tuple(sorted(p[:-1] for p in hits))


def resolve(cfg: LoraConfig, model_cfg, abstract_params, loaded: tuple[LoraSpec, dict] | None = None) -> LoraSpec:
  """The run's LoraSpec from lora.* and, with lora.init_from, the adapter file's (spec, adapters): r, alpha, dropout
  and targets come from the file unless set, and a set value must agree with it (ValueError, one line)."""
  if loaded is None:
    targets = select_targets(model_cfg, abstract_params, cfg.targets)
    alpha = float(cfg.rank) if cfg.alpha is None else cfg.alpha
    return LoraSpec(cfg.rank, alpha, cfg.dropout or 0.0, targets)
  spec, adapters = loaded
  mine = {"rank": cfg.rank or None, "alpha": cfg.alpha, "dropout": cfg.dropout}
  for key, value in mine.items():
    if value is not None and value != getattr(spec, key):
      raise ValueError(f"lora.{key}={value} but the adapter in lora.init_from has {getattr(spec, key)}; unset it")
  if cfg.targets is not None and select_targets(model_cfg, abstract_params, cfg.targets) != spec.targets:
    raise ValueError(f"lora.targets={cfg.targets!r} selects other layers than the adapter in lora.init_from; unset it")
  want = _adapter_shapes(spec, abstract_params)
  flat = traverse_util.flatten_dict(adapters)
  for t, (a_shape, b_shape) in want.items():
    if (flat[t + ("a",)].shape, flat[t + ("b",)].shape) != (a_shape, b_shape):
      raise ValueError(
          f"the adapter in lora.init_from has {_path(t)} shaped {flat[t + ('a',)].shape} x "
          f"{flat[t + ('b',)].shape}, this model needs {a_shape} x {b_shape}: another model?"
      )
  return spec


def _adapter_shapes(spec: LoraSpec, abstract_params) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
  flat = traverse_util.flatten_dict(abstract_params)
  out = {}
  for t in spec.targets:
    *lead, fan_in, fan_out = flat[t + ("kernel",)].shape
    out[t] = ((*lead, fan_in, spec.rank), (*lead, spec.rank, fan_out))
  return out


def init_adapters(spec: LoraSpec, params, key: jax.Array) -> dict:
  """{module path: {"a": A, "b": B}} (nested like the params), float32: A ~ U(+-1/sqrt(in)) as PEFT's
  kaiming_uniform(a=sqrt(5)) on its (r, in) weight, B = 0. Each adapter's key folds in its path (order-free)."""
  key = jax.random.fold_in(key, _LORA_STREAM)
  flat = {}
  for t, (a_shape, b_shape) in _adapter_shapes(spec, params).items():
    k = jax.random.fold_in(key, zlib.crc32(_path(t).encode()) & 0x7FFFFFFF)
    bound = 1.0 / math.sqrt(a_shape[-2])
    flat[t + ("a",)] = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
    flat[t + ("b",)] = jnp.zeros(b_shape, jnp.float32)
  return traverse_util.unflatten_dict(flat)


def adapter_logical_axes(spec: LoraSpec, param_axes) -> dict:
  """Logical PartitionSpecs of the adapters: A like W's input axis, B like W's output axis, rank unsharded."""
  flat = traverse_util.flatten_dict(param_axes)
  out = {}
  for t in spec.targets:
    *lead, ax_in, ax_out = tuple(flat[t + ("kernel",)])
    out[t + ("a",)] = P(*lead, ax_in, None)
    out[t + ("b",)] = P(*lead, None, ax_out)
  return traverse_util.unflatten_dict(out)


def scaled(adapters, scale: float) -> dict:
  """The model's `lora` collection: B times alpha / r (a differentiable multiply: B's gradient is scaled)."""
  flat = traverse_util.flatten_dict(adapters)
  return traverse_util.unflatten_dict({p: v * scale if p[-1] == "b" else v for p, v in flat.items()})


def merge(params, adapters, scale: float) -> dict:
  """The base params with W + A @ B * scale for every adapted kernel, in float32 (or wider: float64 stays)."""
  flat = traverse_util.flatten_dict(params)
  for p, ab in traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: "a" in x).items():
    w = flat[p + ("kernel",)]
    acc = jnp.promote_types(w.dtype, jnp.float32)
    delta = jnp.einsum("...ir,...ro->...io", ab["a"].astype(acc), ab["b"].astype(acc)) * scale
    flat[p + ("kernel",)] = w.astype(acc) + delta
  return traverse_util.unflatten_dict(flat)


@jax.jit
def _leaf_hash(x):
  # Integer sums wrap around modulo 2**32 and are associative: the same bits give the same hash on any mesh.
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32).reshape(-1), jnp.uint32)
  where = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(1)  # position-sensitive
  mixed = (bits ^ (bits >> 15)) * jnp.uint32(0x85EBCA6B)
  return jnp.stack([jnp.sum(bits), jnp.sum(bits * where), jnp.sum(mixed ^ where)])


def fingerprint(params) -> dict[str, list[int]]:
  """Per base tensor: three wrap-around integer sums of its float32 bits (plain, position-weighted, mixed). Equal
  weights give equal numbers on any mesh and process count; changed weights change them (but for a chance
  collision of all three 32-bit sums). LoRA checkpoints store it, so a resume against other base weights (another
  init_from, param_dtype or seed) is caught."""
  flat = traverse_util.flatten_dict(params)
  return {_path(p): [int(v) for v in jax.device_get(_leaf_hash(x))] for p, x in sorted(flat.items())}


def fingerprint_mismatch(saved: dict, current: dict) -> str | None:
  """The first base tensor whose fingerprint differs, or None."""
  return next((k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)), None)
