"""The dispersion terms with the gradient computed in the forward pass (exact, plain JAX, any backend).

Every pairwise term of a sequence b is a function of its normalised tokens zp only through the Gram matrix
g = zp zp^T, and its value is one number per sequence, `out_b`. The chain rule through g gives
d out_b / d zp_i = sum_j (G_ij + G_ji) zp_j with G_ij = d out_b / d g_ij, and for every variant but
perplexity_entropy G is symmetric and built from forward quantities only. So the forward pass also computes the
residual R = d out / d zp (B x L x F, one extra matmul W @ zp), and the backward pass is a per-sequence scale of R:
no pairwise recompute, no L x L residual, no dC.Z and dC^T.Z matmuls (docs: shared/docs/fused-dispersion.md).

Per variant, with x_ij = -D_ij / tau (angular) or -S_ij / tau (l2) and the pairs P_b of the sequence:
- angular_spread, l2_repel: out_b = logsumexp_{P_b} x (the caller adds epsilon and subtracts log N_b); a shift m_i
  per row keeps exp() in range -- static where the logits' range is known (`_static_shift`), else the row maxima
  (flash style) -- and R_i = coef * exp(m_i - out_b) * U_i with U_i = sum_j W_ij zp_j.
- orthogonalization: out_b = sum_{P_b} max(margin - D, 0)^2;  decorrelation: out_b = sum_{P_b} corr^2.
- perplexity_entropy: out_b = sum_i H_i (row entropies); rows are complete inside a row block, so the row softmax
  statistics are exact there; G is not symmetric, so R also accumulates column terms over the blocks.
The straight-through clamp of the angular variants: the value uses clip(c), the gradient is arccos' at clip(c) times
1, i.e. r = rsqrt(1 - clip(c)^2) (jax's arccos JVP) -- both from the clipped cosine only.

Masks enter as two canonical segment codes per token (see `pair_codes`): pair_ij = (code_r_i == code_c_j) & i != j.
`decorrelation_gram`: the Gram identity sum_{i!=j} (z_i.z_j)^2 = |Z^T Z|_F^2 - sum_i |z_i|^4 for one segment per
sequence (O(F^2) memory, no L x L term at all), the lean path of decorrelation.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_SYMMETRIC_LSE = ("angular_spread", "l2_repel")


# Abramowitz & Stegun 4.4.46, highest degree first: acos(a) = sqrt(1 - a) * sum_k c_k a^k on [0, 1], |err| <= 2e-8.
_ACOS_COEFFS = (
    -0.0012624911,
    0.0066700901,
    -0.0170881256,
    0.0308918810,
    -0.0501743046,
    0.0889789874,
    -0.2145988016,
    1.5707963050,
)


def acos_poly(x):
  """arccos for |x| < 1 from *, +, rsqrt and select only (what Mosaic GPU lowers; ~20x faster than XLA's on CPU).

  Measured in float32 on [-0.99, 0.99]: max |error| 4.6e-7 (XLA's float32 arccos 2.6e-7; Cephes' asinf form 3.4e-7
  with two polynomials and two selects; A&S 4.4.45, degree 3, 6.8e-5) at 7 FMAs and one rsqrt.
  """
  a = jnp.abs(x)
  y = 1.0 - a
  p = _ACOS_COEFFS[0]
  for c in _ACOS_COEFFS[1:]:
    p = p * a + c
  r = y * jax.lax.rsqrt(y) * p
  return jnp.where(x < 0, math.pi - r, r)


class Params(NamedTuple):
  tau_l2: float
  tau_cos: float
  margin: float
  epsilon: float
  clamp_threshold: float


def pair_codes(valid_BxL, seg_BxL, diag_included: bool = False):
  """(code_r, code_c, partners) for masks and segments; pair_ij = code_r_i == code_c_j (and i != j unless diag).

  seg_BxL None means one segment per sequence. Else a token's code is the first position of its segment id ([0, L):
  no user id collides with the -1 / -2 of invalid tokens); partners_i = how many tokens token i pairs with. Both are
  fused [L, L] compare-reductions (no L x L buffer; O(L^2) compares, negligible next to the O(L^2 F) Gram matrix).
  """
  if seg_BxL is None:  # one segment per sequence: O(L), and nothing for XLA to constant-fold at [L, L]
    partners = jnp.sum(valid_BxL, axis=-1, keepdims=True, dtype=jnp.int32) - (0 if diag_included else 1)
    code = jnp.zeros(valid_BxL.shape, jnp.int32)
    return (jnp.where(valid_BxL, code, -1), jnp.where(valid_BxL, code, -2), jnp.where(valid_BxL, partners, 0))
  same = seg_BxL[:, :, None] == seg_BxL[:, None, :]
  code = jnp.argmax(same, axis=-1).astype(jnp.int32)
  partners = jnp.sum(same & valid_BxL[:, None, :], axis=-1, dtype=jnp.int32) - (0 if diag_included else 1)
  partners = jnp.where(valid_BxL, partners, 0)
  return jnp.where(valid_BxL, code, -1), jnp.where(valid_BxL, code, -2), partners


def _static_shift(variant: str, p: Params, dtype):
  """A shift of the logits known before the pass, so no row-max pass: l2_repel's own diagonal pair has x = 0, the
  row maximum, so 0 is exact and every row sum is >= 1; angular_spread's x lies in [-(1 - D_min) / tau, -D_min / tau]
  with D_min = acos(1 - t) / pi, so exp() cannot underflow unless that range exceeds ~80 (float32); else None.

  The shift is an upper bound of every logit, not of the logsumexp: a row with one pair sums to exp(x - m) < 1, so
  the backward scale exp(m - lse) exceeds 1 (up to exp(range), which the same bound keeps finite). Every row sum of
  a row with a pair is >= exp(-range) > 0, which the `s > 0` guards rely on."""
  if variant == "l2_repel":
    return 0.0
  if variant == "angular_spread":
    d_min = math.acos(1.0 - p.clamp_threshold) / math.pi
    if (1.0 - 2.0 * d_min) / p.tau_cos < 0.9 * -math.log(jnp.finfo(dtype).tiny):
      return -d_min / p.tau_cos
  return None


def _block(variant: str, p: Params, zq, cq, iq, zk, ck, grad: bool):
  """One block of query rows [B, C] against all keys [B, L]: row statistics and (grad) row residual parts."""
  pair = cq[:, :, None] == ck[:, None, :]
  if variant != "l2_repel":
    pair &= iq[:, None] != jnp.arange(zk.shape[1])[None, :]
  g = jnp.einsum("bcf,blf->bcl", zq, zk)
  out, col = {}, None
  if variant in ("angular_spread", "orthogonalization"):
    t = p.clamp_threshold
    ct = jnp.clip(g, -1.0 + t, 1.0 - t)
    # float32 and below: the polynomial (error 4.6e-7, like XLA's arccos, at a fraction of its cost); float64: exact.
    dist = (jnp.arccos(ct) if ct.dtype == jnp.float64 else acos_poly(ct)) / math.pi
    r = jax.lax.rsqrt(1.0 - ct * ct)  # |d arccos / dc| at the clipped point: the straight-through gradient
    if variant == "angular_spread":
      x = -dist / p.tau_cos
    else:
      h = jnp.where(pair, jnp.maximum(p.margin - dist, 0.0), 0.0)
      out["sum"] = jnp.sum(h * h, axis=-1)
      w = h * r
  elif variant == "decorrelation":
    corr = jnp.where(pair, g / (zq.shape[-1] - 1), 0.0)
    out["sum"] = jnp.sum(corr * corr, axis=-1)
    w = corr
  else:  # l2_repel, perplexity_entropy: squared distances, clamped at 0 like the reference
    raw = jnp.sum(zq * zq, -1)[:, :, None] + jnp.sum(zk * zk, -1)[:, None, :] - 2.0 * g
    sigma = jnp.where(raw > 0, 1.0, jnp.where(raw == 0, 0.5, 0.0))  # jnp.maximum's derivative (0.5 at a tie)
    x = -jnp.maximum(raw, 0.0) / p.tau_l2
  if variant in _SYMMETRIC_LSE or variant == "perplexity_entropy":
    m = _static_shift(variant, p, x.dtype)
    if m is None:  # flash-style row maxima
      m = jnp.max(jnp.where(pair, x, -jnp.inf), axis=-1)
      m = jnp.where(jnp.isfinite(m), m, 0.0)
    else:
      m = jnp.full(x.shape[:2], m, x.dtype)
    e = jnp.where(pair, jnp.exp(jnp.where(pair, x - m[..., None], 0.0)), 0.0)
    s = jnp.sum(e, axis=-1)
    out["m"], out["s"] = m, s
  if variant == "angular_spread":
    w = e * r
  if variant == "perplexity_entropy":
    pr = e / jnp.where(s > 0, s, 1.0)[..., None]
    logq = jnp.log(pr + p.epsilon)
    out["sum"] = -jnp.sum(pr * logq, axis=-1) / math.log(2.0)
  if not grad:
    return out, col
  if variant == "l2_repel":
    w = e * sigma
    out["u"] = zq * jnp.sum(w, -1)[..., None] - jnp.einsum("bcl,blf->bcf", w, zk)
  elif variant == "perplexity_entropy":
    # -ln2 * dH_i/dp_ij. No multiply inside q - sum(p q): XLA would contract it into an FMA in one fusion only,
    # and a one-hot row (exact zeros in the reference) would get rounding noise instead of exactly 0.
    q = logq + pr / (pr + p.epsilon)
    a = pr * (q - jnp.sum(pr * q, -1, keepdims=True)) * (sigma / (p.tau_l2 * math.log(2.0)))  # dH_i/d raw_ij
    out["u"] = 2.0 * (zq * jnp.sum(a, -1)[..., None] - jnp.einsum("bcl,blf->bcf", a, zk))
    col = (jnp.sum(a, 1), jnp.einsum("bcl,bcf->blf", a, zq))  # d raw_ij / d z_j terms, summed over these rows
  else:
    out["u"] = jnp.einsum("bcl,blf->bcf", w, zk)
  return out, col


def _all_blocks(variant, p, zp, code_r, code_c, block_size, grad):
  """_block over every row, densely or in row blocks (a scan: only the column terms are carried)."""
  B, L, F = zp.shape
  idx = jnp.arange(L)
  if block_size is None or block_size >= L:
    return _block(variant, p, zp, code_r, idx, zp, code_c, grad)
  nb = -(-L // block_size)
  pad = nb * block_size - L
  zq = jnp.pad(zp, ((0, 0), (0, pad), (0, 0)))
  cq = jnp.pad(code_r, ((0, 0), (0, pad)), constant_values=-1)  # padded rows pair with nothing
  iq = jnp.pad(idx, (0, pad), constant_values=-1)
  has_col = grad and variant == "perplexity_entropy"

  def step(carry, k):
    sl = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, k * block_size, block_size, axis=axis)
    out, col = _block(variant, p, sl(zq, 1), sl(cq, 1), sl(iq, 0), zp, code_c, grad)
    if has_col:
      carry = jax.tree.map(jnp.add, carry, col)
    return carry, out

  init = (jnp.zeros((B, L), zp.dtype), jnp.zeros((B, L, F), zp.dtype)) if has_col else ()
  col, outs = jax.lax.scan(step, init, jnp.arange(nb))
  outs = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(B, nb * block_size, *a.shape[3:])[:, :L], outs)
  return outs, (col if has_col else None)


def _forward(variant, p, block_size, zp, code_r, code_c, grad: bool):
  out, col = _all_blocks(variant, p, zp, code_r, code_c, block_size, grad)
  if variant in _SYMMETRIC_LSE:
    m, s = out["m"], out["s"]
    has = s > 0
    row = jnp.where(has, m + jnp.log(jnp.where(has, s, 1.0)), -jnp.inf)
    top = jnp.max(row, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    tot = jnp.sum(jnp.where(has, jnp.exp(row - top), 0.0), axis=-1)
    val = jnp.where(tot > 0, top[:, 0] + jnp.log(jnp.where(tot > 0, tot, 1.0)), 0.0)
  else:
    val = jnp.sum(out["sum"], axis=-1)
  if not grad:
    return val, None
  u = out["u"]
  if variant in _SYMMETRIC_LSE:
    coef = 2.0 / (math.pi * p.tau_cos) if variant == "angular_spread" else -4.0 / p.tau_l2
    # d lse / d x_ij = exp(x_ij - lse) = e_ij * exp(m_i - lse). No clamp: with few pairs and a small tau the static
    # shift m lies above the lse (one pair: lse = x <= m), and that ratio is the gradient. It is finite for every
    # input: flash rows have m_i <= max x <= lse; a static m has m - lse <= m - min x, the logits' range, which
    # _static_shift admits only below 0.9 * -log(tiny), so exp() <= tiny^-0.9 < the largest float.
    scale = jnp.where(has, jnp.exp(m - val[:, None]), 0.0)
    res = coef * scale[..., None] * u
  elif variant == "orthogonalization":
    res = (4.0 / math.pi) * u
  elif variant == "decorrelation":
    res = (4.0 / (zp.shape[-1] - 1)) * u
  else:
    col_sum, col_u = col  # d raw_ij / d z_j: the column terms, summed over all row blocks
    res = u + 2.0 * (zp * col_sum[..., None] - col_u)
  return val, res


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pair_sums(variant: str, p: Params, block_size: int | None, zp, code_r, code_c):
  """Per-sequence pairwise value out_b [B] (see the module doc); its gradient is formed in the forward pass."""
  return _forward(variant, p, block_size, zp, code_r, code_c, grad=False)[0]


def _pair_sums_fwd(variant, p, block_size, zp, code_r, code_c):
  return _forward(variant, p, block_size, zp, code_r, code_c, grad=True)


def _pair_sums_bwd(variant, p, block_size, res, g_B):
  return g_B[:, None, None].astype(res.dtype) * res, None, None


pair_sums.defvjp(_pair_sums_fwd, _pair_sums_bwd)


def _gram(zs_BxLxF, valid_BxL, grad: bool):
  z = jnp.where(valid_BxL[..., None], zs_BxLxF, 0.0)
  gram = jnp.einsum("blf,blg->bfg", z, z, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(z * z, axis=-1)
  scale = 1.0 / (z.shape[-1] - 1) ** 2
  val = (jnp.sum(gram * gram, axis=(1, 2)) - jnp.sum(sq * sq, axis=-1)) * scale
  if not grad:
    return val, None
  zg = jnp.einsum("blf,bfg->blg", z, gram, precision=jax.lax.Precision.HIGHEST)
  return val, (4.0 * scale) * (zg - sq[..., None] * z)


@jax.custom_vjp
def decorrelation_gram(zs_BxLxF, valid_BxL):
  """sum over valid i != j of corr_ij^2 per sequence, by the Gram identity (one segment per sequence).

  Float32 cancellation: |Z^T Z|^2 holds the diagonal terms L (F-1)^2 that are subtracted again, so the Gram
  matmuls run at HIGHEST precision (TF32 there would cost ~1e-3 relative). Gradient 4 (Z G - |z|^2 z) / (F-1)^2,
  formed in the forward pass like pair_sums.
  """
  return _gram(zs_BxLxF, valid_BxL, grad=False)[0]


decorrelation_gram.defvjp(
    lambda zs, valid: _gram(zs, valid, grad=True), lambda res, g_B: (g_B[:, None, None].astype(res.dtype) * res, None)
)
