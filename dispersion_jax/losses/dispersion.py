"""The five dispersion losses of the paper, as pure jit-able functions.

Every pairwise term lives inside one sequence: an [L, L] matrix per sequence, reduced over its valid pairs, then
averaged over the sequences that have at least one valid pair. Two implementations of the same
values and gradients (`impl`, decided in `resolve_impl`):
- the default, an exact reformulation that forms the gradient in the forward pass (`dispersion_fused`: the backward
  pass is a per-sequence scale of a [B, L, F] residual, no pairwise recompute and no [B, L, L] residual), with a
  Mosaic GPU kernel for the angular variants (`dispersion_pallas`, opt-in);
- impl="reference", the previous path: *row statistics* (one number per query token, reduced over all key tokens),
  run densely or in row blocks under `jax.checkpoint`, differentiated by plain autodiff.

Defined where the reference yields NaN (documented behaviour):
- a sequence with no valid pair (L = 1, max_tokens = 1, everything masked) contributes nothing and is left out of
  the batch mean; if no sequence has a pair the loss is 0 with zero gradient;
- `decorrelation` treats a token vector with zero variance as a zero standardised vector (its correlations are 0).
"""

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from dispersion_jax.losses import dispersion_fused as fused
from dispersion_jax.losses import dispersion_pallas
from dispersion_jax.parallel import backend as backend_lib

Variant = Literal["decorrelation", "l2_repel", "angular_spread", "orthogonalization", "perplexity_entropy"]
VARIANTS: tuple[str, ...] = ("decorrelation", "l2_repel", "angular_spread", "orthogonalization", "perplexity_entropy")
_LSE_VARIANTS = ("l2_repel", "angular_spread")  # value = logsumexp over pairs - log(#pairs)
_DIAG_INCLUDED = ("l2_repel",)  # l2_repel keeps the i == j pairs
_L2_REPEL_NORM_WEIGHT = 0.1  # reference: + 0.1 * mean(z ** 2)
DEFAULT_BLOCK_SIZE = 512  # dense speed up to L = 512, lean beyond (docs/benchmarks.md)
IMPLS: tuple[str, ...] = ("auto", "xla", "pallas", "reference", "pallas_interpret")  # the last: tests only


def _masked_lse(x, valid, axis: int):
  """logsumexp over `valid` entries; finite (and zero-gradient) where no entry is valid."""
  fill = jnp.finfo(x.dtype).min
  m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, x, fill), axis=axis, keepdims=True))
  m = jnp.where(jnp.any(valid, axis=axis, keepdims=True), m, 0.0)
  s = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, x - m, 0.0)), 0.0), axis=axis, keepdims=True)
  any_valid = s > 0
  out = m + jnp.log(jnp.where(any_valid, s, 1.0))
  return jnp.squeeze(jnp.where(any_valid, out, 0.0), axis)


def _standardise(z_BxLxF):
  """Per-token standardisation over features (unbiased std); zero-variance tokens map to zeros."""
  d = z_BxLxF - jnp.mean(z_BxLxF, axis=-1, keepdims=True)
  var = jnp.sum(d * d, axis=-1, keepdims=True) / (z_BxLxF.shape[-1] - 1)
  ok = var > 0
  return jnp.where(ok, d / jnp.sqrt(jnp.where(ok, var, 1.0)), 0.0)


def _angular_distance(zq_BxCxF, zk_BxLxF, clamp_threshold: float):
  c = jnp.einsum("bcf,blf->bcl", zq_BxCxF, zk_BxLxF)
  # Straight-through clamp: forward uses the clamped cosine, backward differentiates arccos at the clamped point.
  c_st = c + jax.lax.stop_gradient(jnp.clip(c, -1.0 + clamp_threshold, 1.0 - clamp_threshold) - c)
  return jnp.arccos(c_st) / math.pi


def _sq_distance(zq_BxCxF, zk_BxLxF):
  nq = jnp.sum(zq_BxCxF * zq_BxCxF, axis=-1)[:, :, None]
  nk = jnp.sum(zk_BxLxF * zk_BxLxF, axis=-1)[:, None, :]
  return jnp.maximum(nq + nk - 2.0 * jnp.einsum("bcf,blf->bcl", zq_BxCxF, zk_BxLxF), 0.0)


def _row_stats(variant: str, params: dict, zq_BxCxF, zk_BxLxF, pair_BxCxL):
  """One number per query row: a logsumexp (lse variants), a sum (mean variants) or an entropy."""
  if variant == "decorrelation":
    corr = jnp.einsum("bcf,blf->bcl", zq_BxCxF, zk_BxLxF) / (zq_BxCxF.shape[-1] - 1)
    return jnp.sum(jnp.where(pair_BxCxL, corr * corr, 0.0), axis=-1)
  if variant == "l2_repel":
    logits = -_sq_distance(zq_BxCxF, zk_BxLxF) / params["tau_l2"] + params["epsilon"]
    return _masked_lse(logits, pair_BxCxL, axis=-1)
  if variant == "angular_spread":
    dist = _angular_distance(zq_BxCxF, zk_BxLxF, params["clamp_threshold"])
    return _masked_lse(-dist / params["tau_cos"] + params["epsilon"], pair_BxCxL, axis=-1)
  if variant == "orthogonalization":
    dist = _angular_distance(zq_BxCxF, zk_BxLxF, params["clamp_threshold"])
    hinge = jnp.maximum(params["margin"] - dist, 0.0)
    return jnp.sum(jnp.where(pair_BxCxL, hinge * hinge, 0.0), axis=-1)
  # perplexity_entropy: entropy (bits) of the softmax over the other tokens of the row.
  logits = -_sq_distance(zq_BxCxF, zk_BxLxF) / params["tau_l2"]
  logp = logits - _masked_lse(logits, pair_BxCxL, axis=-1)[..., None]
  p = jnp.where(pair_BxCxL, jnp.exp(jnp.where(pair_BxCxL, logp, 0.0)), 0.0)
  return -jnp.sum(p * jnp.log(p + params["epsilon"]), axis=-1) / math.log(2.0)


def _pair_mask(variant: str, valid_q_BxC, seg_q_BxC, idx_q_C, valid_k_BxL, seg_k_BxL):
  pair = valid_q_BxC[:, :, None] & valid_k_BxL[:, None, :] & (seg_q_BxC[:, :, None] == seg_k_BxL[:, None, :])
  if variant not in _DIAG_INCLUDED:
    pair &= idx_q_C[:, None] != jnp.arange(valid_k_BxL.shape[1])[None, :]
  return pair


def _all_row_stats(variant: str, params: dict, z_BxLxF, valid_BxL, seg_BxL, block_size: int | None):
  """Row statistics for every row, densely (one block) or in checkpointed row blocks."""
  B, L, F = z_BxLxF.shape
  idx_L = jnp.arange(L)

  def block(zq_BxCxF, valid_q_BxC, seg_q_BxC, idx_q_C):
    pair = _pair_mask(variant, valid_q_BxC, seg_q_BxC, idx_q_C, valid_BxL, seg_BxL)
    return _row_stats(variant, params, zq_BxCxF, z_BxLxF, pair), jnp.any(pair, axis=-1)

  if block_size is None or block_size >= L:
    return block(z_BxLxF, valid_BxL, seg_BxL, idx_L)
  nb = -(-L // block_size)
  pad = nb * block_size - L
  # Padded rows are invalid queries: they join no pair and produce no statistic.
  zq_BxPxF = jnp.pad(z_BxLxF, ((0, 0), (0, pad), (0, 0)))
  vq_BxP, sq_BxP = jnp.pad(valid_BxL, ((0, 0), (0, pad))), jnp.pad(seg_BxL, ((0, 0), (0, pad)))
  iq_P = jnp.pad(idx_L, (0, pad), constant_values=-1)

  @jax.checkpoint  # keep only the block index for backward; the [B, block, L] terms are recomputed
  def one_block(b):
    sl = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, b * block_size, block_size, axis=axis)
    return block(sl(zq_BxPxF, 1), sl(vq_BxP, 1), sl(sq_BxP, 1), sl(iq_P, 0))

  stats, has_pair = jax.lax.map(one_block, jnp.arange(nb))
  unblock = lambda a: a.swapaxes(0, 1).reshape(B, nb * block_size)[:, :L]
  return unblock(stats), unblock(has_pair)


def _check(z, variant: str, tau_l2: float, tau_cos: float, max_tokens, key, mask, segment_ids):
  if variant not in VARIANTS:
    raise ValueError(f"unknown dispersion variant {variant!r}; use one of {', '.join(VARIANTS)}")
  if z.ndim != 3:
    raise ValueError(f"dispersion_loss expects z of shape [B, L, F], got shape {tuple(z.shape)}")
  if z.shape[-1] < 2:
    raise ValueError(f"dispersion_loss needs at least 2 features (F >= 2), got F={z.shape[-1]}")
  if tau_l2 <= 0 or tau_cos <= 0:
    raise ValueError(f"temperatures must be positive, got tau_l2={tau_l2}, tau_cos={tau_cos}")
  if max_tokens is not None and max_tokens < z.shape[1] and key is None:
    raise ValueError("max_tokens < L subsamples tokens: pass key=jax.random.PRNGKey(...) (e.g. folded from step)")
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
  for name, m in (("mask", mask), ("segment_ids", segment_ids)):
    if m is not None and tuple(m.shape) != tuple(z.shape[:2]):
      raise ValueError(f"{name} must have shape [B, L]={tuple(z.shape[:2])}, got {tuple(m.shape)}")


def _prepare(z, key, mask, segment_ids, variant: str, epsilon: float, max_tokens):
  """Promotion, masks, token subsampling and the per-variant normalisation, shared by every impl."""
  B, L, _ = z.shape
  # The pairwise part runs in float32 at least: bf16 cosines are too coarse near +-1 for arccos.
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  valid_BxL = jnp.ones((B, L), bool) if mask is None else mask.astype(bool)
  seg_BxL = jnp.zeros((B, L), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if max_tokens is not None and max_tokens < L:
    # One subset of positions shared by the whole batch, as in the reference, but from an explicit key.
    keep_K = jnp.sort(jax.random.choice(key, L, (max_tokens,), replace=False))
    z, valid_BxL, seg_BxL = z[:, keep_K], valid_BxL[:, keep_K], seg_BxL[:, keep_K]
  if variant == "decorrelation":
    zp = _standardise(z)
  elif variant in ("angular_spread", "orthogonalization"):
    zp = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + epsilon)
  else:
    zp = z
  return z, zp, valid_BxL, seg_BxL


def _finish(variant: str, per_seq_B, has_B, z, valid_BxL):
  """Mean over the sequences that have a pair (+ l2_repel's norm term)."""
  n_seq = jnp.sum(has_B)
  loss = jnp.sum(jnp.where(has_B, per_seq_B, 0.0)) / jnp.maximum(n_seq, 1).astype(z.dtype)
  if variant == "l2_repel":
    w_BxLx1 = valid_BxL[..., None].astype(z.dtype)
    denom = jnp.maximum(jnp.sum(w_BxLx1) * z.shape[-1], 1.0)
    loss = loss + _L2_REPEL_NORM_WEIGHT * jnp.sum(w_BxLx1 * z * z) / denom
  return loss


def _reference_loss(variant: str, params: dict, z, zp, valid_BxL, seg_BxL, block_size):
  """impl="reference": plain autodiff through row statistics (dense, or jax.checkpoint-ed row blocks)."""
  stats_BxL, has_pair_BxL = _all_row_stats(variant, params, zp, valid_BxL, seg_BxL, block_size)
  n_pairs_B = _count_pairs(variant, valid_BxL, seg_BxL)
  has_B = n_pairs_B > 0
  safe_pairs_B = jnp.where(has_B, n_pairs_B, 1.0).astype(z.dtype)
  if variant in _LSE_VARIANTS:
    per_seq_B = _masked_lse(stats_BxL, has_pair_BxL, axis=-1) - jnp.log(safe_pairs_B)
  elif variant == "perplexity_entropy":
    n_rows_B = jnp.maximum(jnp.sum(has_pair_BxL, axis=-1), 1).astype(z.dtype)
    per_seq_B = -jnp.sum(jnp.where(has_pair_BxL, stats_BxL, 0.0), axis=-1) / n_rows_B
  else:
    per_seq_B = jnp.sum(jnp.where(has_pair_BxL, stats_BxL, 0.0), axis=-1) / safe_pairs_B
  return per_seq_B, has_B


def _fused_loss(variant: str, params: dict, z, zp, valid_BxL, seg_BxL, block_size, one_segment: bool, impl: str):
  """impl="xla" / "pallas": the gradient-in-forward reformulation (dispersion_fused, dispersion_pallas)."""
  code_r, code_c, partners_BxL = fused.pair_codes(
      valid_BxL, None if one_segment else seg_BxL, diag_included=variant in _DIAG_INCLUDED
  )
  n_pairs_B = jnp.sum(partners_BxL, axis=-1)
  has_B = n_pairs_B > 0
  safe_pairs_B = jnp.where(has_B, n_pairs_B, 1).astype(z.dtype)
  p = fused.Params(**params)
  if variant == "decorrelation" and one_segment and block_size is not None and block_size < zp.shape[1]:
    # The lean path for decorrelation: O(F^2) memory instead of row blocks of the pair matrix.
    out_B = fused.decorrelation_gram(zp, valid_BxL)
  elif impl.startswith("pallas") and variant in dispersion_pallas.KERNEL_VARIANTS:
    out_B = dispersion_pallas.pair_sums(variant, p, zp, code_r, code_c, interpret=impl == "pallas_interpret")
  else:
    out_B = fused.pair_sums(variant, p, block_size, zp, code_r, code_c)
  if variant in _LSE_VARIANTS:
    per_seq_B = params["epsilon"] + out_B - jnp.log(safe_pairs_B)
  elif variant == "perplexity_entropy":
    per_seq_B = -out_B / jnp.maximum(jnp.sum(partners_BxL > 0, axis=-1), 1).astype(z.dtype)
  else:
    per_seq_B = out_B / safe_pairs_B
  return per_seq_B, has_B


@functools.partial(
    jax.jit,
    static_argnames=(
        "variant",
        "tau_l2",
        "tau_cos",
        "margin",
        "epsilon",
        "clamp_threshold",
        "max_tokens",
        "block_size",
        "impl",
    ),
)
def _dispersion_loss(
    z,
    key,
    mask,
    segment_ids,
    *,
    variant,
    tau_l2,
    tau_cos,
    margin,
    epsilon,
    clamp_threshold,
    max_tokens,
    block_size,
    impl,
):
  z, zp, valid_BxL, seg_BxL = _prepare(z, key, mask, segment_ids, variant, epsilon, max_tokens)
  params = dict(tau_l2=tau_l2, tau_cos=tau_cos, margin=margin, epsilon=epsilon, clamp_threshold=clamp_threshold)
  if impl == "reference":
    per_seq_B, has_B = _reference_loss(variant, params, z, zp, valid_BxL, seg_BxL, block_size)
  else:
    per_seq_B, has_B = _fused_loss(
        variant, params, z, zp, valid_BxL, seg_BxL, block_size, one_segment=segment_ids is None, impl=impl
    )
  return _finish(variant, per_seq_B, has_B, z, valid_BxL)


def _count_pairs(variant: str, valid_BxL, seg_BxL):
  same = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & valid_BxL[:, :, None] & valid_BxL[:, None, :]
  n = jnp.sum(same, axis=(1, 2))
  if variant not in _DIAG_INCLUDED:
    n = n - jnp.sum(valid_BxL, axis=-1)
  return n


def resolve_impl(impl: str, variant: str, backend: str | None = None) -> str:
  """What `impl` runs: THE one place where impl="auto" is decided.

  - "xla": the exact gradient-in-forward reformulation in plain JAX (dispersion_fused), on every backend.
  - "pallas": the Mosaic GPU kernel (dispersion_pallas) for angular_spread / orthogonalization on a GPU; the
    other variants run "xla". Needs a CUDA GPU (tests run the kernel in GPU interpret mode: "pallas_interpret").
  - "reference": the previous plain-autodiff path (row statistics, jax.checkpoint-ed row blocks), for comparison.
  - "auto": "xla" everywhere. The kernel is chosen only where it was measured faster than "xla" on that GPU; no
    such measurement exists yet (bench: python -m dispersion_jax bench-dispersion), so auto never picks
    it. Change it here, and only here, once the H100/H200 numbers are in.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown dispersion impl {impl!r}; use one of {', '.join(IMPLS)}")
  if impl == "auto":
    return "xla"
  if impl == "pallas" and variant in dispersion_pallas.KERNEL_VARIANTS:
    backend = backend or backend_lib.current()
    if backend != "gpu":
      raise ValueError(
          f"impl='pallas' needs a CUDA GPU (the Mosaic GPU kernel); the backend is {backend!r}: "
          "use impl='xla' or 'auto'"
      )
  return impl


def dispersion_loss(
    z,
    variant: Variant = "angular_spread",
    *,
    tau_l2: float = 1.0,
    tau_cos: float = 1.0,
    margin: float = 0.5,
    epsilon: float = 1e-2,
    clamp_threshold: float = 0.25,
    max_tokens: int | None = None,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    impl: str = "auto",
):
  """Dispersion loss of hidden states `z` [B, L, F] (lower = more dispersed).

  mask [B, L] bool: False positions join no pair and get zero gradient.
  segment_ids [B, L] int: only pairs within the same segment (document) count.
  max_tokens + key: keep one random subset of max_tokens positions, shared by the batch (None = all tokens).
  block_size: rows per block (memory O(B * block_size * L)); None = one dense block. Not used by the kernel;
    decorrelation without segment_ids and block_size < L takes the O(F^2) Gram identity instead of row blocks.
  impl: "auto" | "xla" | "pallas" | "reference" (see `resolve_impl`; auto = the XLA reformulation).
  Returns a scalar in float32 (float64 for float64 input).
  """
  _check(z, variant, tau_l2, tau_cos, max_tokens, key, mask, segment_ids)
  if max_tokens is not None and max_tokens >= z.shape[1]:
    max_tokens = None
  return _dispersion_loss(
      z,
      key,
      mask,
      segment_ids,
      variant=variant,
      tau_l2=float(tau_l2),
      tau_cos=float(tau_cos),
      margin=float(margin),
      epsilon=float(epsilon),
      clamp_threshold=float(clamp_threshold),
      max_tokens=max_tokens,
      block_size=block_size,
      impl=resolve_impl(impl, variant),
  )
