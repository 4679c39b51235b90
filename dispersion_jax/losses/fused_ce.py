"""Fused LM head + cross-entropy in token chunks: the [B, L, V] float32 logits are never materialised.

The plain path (`model` logits -> `objective.cross_entropy`) keeps logits_BxLxV in float32 for backward and then
builds their gradient of the same size: 2 x 3.3 GB at GPT-2 124M, B=16, L=1024. Here the tokens go through the
tied head `chunk` rows at a time; a chunk's logits and softmax gradient live only inside one loop iteration.
The gradients w.r.t. the hidden states and the embedding are computed in that same forward loop (as Liger's fused
linear cross-entropy does), so backward only scales them: no head matmul is recomputed, unlike a
`jax.checkpoint`-ed scan, which would redo one N x V x D matmul (~10% of a GPT-2 124M step's FLOPs).
Not twice differentiable (custom_vjp).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK = 512  # tokens; on CPU as fast as the plain path, 1024-2048 slower (docs/benchmarks.md)


def fused_cross_entropy(x_BxLxD, emb_VxD, targets_BxL, weights_BxL=None, *, chunk: int = DEFAULT_CHUNK):
  """= cross_entropy(einsum('bld,vd->blv', x, emb) accumulated in float32, targets, weights).

  x_BxLxD: final hidden states (after ln_f) in the compute dtype; emb_VxD: the tied embedding, already cast to
  the compute dtype (as the model does, so its gradient flows back through that cast).
  chunk: tokens per loop iteration, over the whole batch. Chunks cut the sequence, never the batch: the batch is
  the axis sharded over devices, so every device works on its own rows in every iteration (chunks of flattened
  tokens would each live on one device and serialise the loop across the mesh). C = max(1, chunk // B) positions.
  """
  B, L, D = x_BxLxD.shape
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  w_BxL = jnp.ones((B, L), acc) if weights_BxL is None else weights_BxL.astype(acc)
  positions = max(1, min(L, chunk // B))
  nll_sum = _weighted_nll_sum(x_BxLxD, emb_VxD, targets_BxL.astype(jnp.int32), w_BxL, positions)
  return nll_sum / jnp.maximum(jnp.sum(w_BxL), 1.0)


def _chunks(a_BxL, positions: int):
  """[B, L, ...] -> [n, B, positions, ...], zero-padded on L (padded positions have weight 0)."""
  n = -(-a_BxL.shape[1] // positions)
  a_BxL = jnp.pad(a_BxL, [(0, 0), (0, n * positions - a_BxL.shape[1])] + [(0, 0)] * (a_BxL.ndim - 2))
  return jnp.moveaxis(a_BxL.reshape(a_BxL.shape[0], n, positions, *a_BxL.shape[2:]), 1, 0)


def _unchunk(a_nxBxC, length: int):
  """[n, B, C, ...] -> [B, length, ...]."""
  a_BxnxC = jnp.moveaxis(a_nxBxC, 0, 1)
  return a_BxnxC.reshape(a_BxnxC.shape[0], -1, *a_BxnxC.shape[3:])[:, :length]


def _fwd(x_BxLxD, emb_VxD, t_BxL, w_BxL, positions: int):
  B, L, D = x_BxLxD.shape
  V = emb_VxD.shape[0]
  acc = w_BxL.dtype

  def body(dE_VxD, xs):
    x_BxCxD, t_BxC, w_BxC = xs
    logits_BxCxV = jnp.einsum("bcd,vd->bcv", x_BxCxD, emb_VxD, preferred_element_type=acc)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    nll_BxC = lse_BxC - jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    # d(sum w nll) / dlogits = w * (softmax - onehot(target)); cast like autodiff casts the cotangent.
    onehot_BxCxV = t_BxC[..., None] == jnp.arange(V)
    g_BxCxV = ((jnp.exp(logits_BxCxV - lse_BxC[..., None]) - onehot_BxCxV) * w_BxC[..., None]).astype(x_BxCxD.dtype)
    dx_BxCxD = jnp.einsum("bcv,vd->bcd", g_BxCxV, emb_VxD, preferred_element_type=acc)
    dE_VxD = dE_VxD + jnp.einsum("bcv,bcd->vd", g_BxCxV, x_BxCxD, preferred_element_type=acc)
    return dE_VxD, (nll_BxC, dx_BxCxD)

  xs = (_chunks(x_BxLxD, positions), _chunks(t_BxL, positions), _chunks(w_BxL, positions))
  dE_VxD, (nll_nxBxC, dx_nxBxCxD) = jax.lax.scan(body, jnp.zeros((V, D), acc), xs)
  nll_BxL, dx_BxLxD = _unchunk(nll_nxBxC, L), _unchunk(dx_nxBxCxD, L)
  return jnp.sum(nll_BxL * w_BxL), dx_BxLxD, dE_VxD, nll_BxL


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(x_BxLxD, emb_VxD, t_BxL, w_BxL, positions: int):
  return _fwd(x_BxLxD, emb_VxD, t_BxL, w_BxL, positions)[0]


def _vjp_fwd(x_BxLxD, emb_VxD, t_BxL, w_BxL, positions: int):
  loss, dx, dE, nll = _fwd(x_BxLxD, emb_VxD, t_BxL, w_BxL, positions)
  return loss, (dx, dE, nll, jnp.zeros((0,), x_BxLxD.dtype), jnp.zeros((0,), emb_VxD.dtype))


def _vjp_bwd(positions: int, res, g):
  del positions
  dx, dE, nll, x_tag, emb_tag = res  # zero-size tags carry the input dtypes through the residuals
  t_ct = np.zeros(nll.shape, jax.dtypes.float0)  # integer targets: no cotangent
  return (g * dx).astype(x_tag.dtype), (g * dE).astype(emb_tag.dtype), t_ct, g * nll


_weighted_nll_sum.defvjp(_vjp_fwd, _vjp_bwd)
