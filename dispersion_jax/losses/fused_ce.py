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
  """
  B, L, D = x_BxLxD.shape
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  w_N = jnp.ones((B * L,), acc) if weights_BxL is None else weights_BxL.reshape(B * L).astype(acc)
  nll_sum = _weighted_nll_sum(
      x_BxLxD.reshape(B * L, D), emb_VxD, targets_BxL.reshape(B * L).astype(jnp.int32), w_N, min(chunk, B * L)
  )
  return nll_sum / jnp.maximum(jnp.sum(w_N), 1.0)


def _chunks(a, chunk: int):
  """[N, ...] -> [n, chunk, ...], zero-padded (padded rows have weight 0)."""
  n = -(-a.shape[0] // chunk)
  a = jnp.pad(a, [(0, n * chunk - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  return a.reshape(n, chunk, *a.shape[1:])


def _fwd(x_NxD, emb_VxD, t_N, w_N, chunk: int):
  N, D = x_NxD.shape
  V = emb_VxD.shape[0]
  acc = w_N.dtype

  def body(dE_VxD, xs):
    x_CxD, t_C, w_C = xs
    logits_CxV = jnp.einsum("cd,vd->cv", x_CxD, emb_VxD, preferred_element_type=acc)
    lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
    nll_C = lse_C - jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
    # d(sum_c w_c nll_c) / dlogits = w * (softmax - onehot(target)); cast like autodiff casts the cotangent.
    onehot_CxV = t_C[:, None] == jnp.arange(V)[None, :]
    g_CxV = ((jnp.exp(logits_CxV - lse_C[:, None]) - onehot_CxV) * w_C[:, None]).astype(x_CxD.dtype)
    dx_CxD = jnp.einsum("cv,vd->cd", g_CxV, emb_VxD, preferred_element_type=acc)
    dE_VxD = dE_VxD + jnp.einsum("cv,cd->vd", g_CxV, x_CxD, preferred_element_type=acc)
    return dE_VxD, (nll_C, dx_CxD)

  xs = (_chunks(x_NxD, chunk), _chunks(t_N, chunk), _chunks(w_N, chunk))
  dE_VxD, (nll_nxC, dx_nxCxD) = jax.lax.scan(body, jnp.zeros((V, D), acc), xs)
  nll_N = nll_nxC.reshape(-1)[:N]
  dx_NxD = dx_nxCxD.reshape(-1, D)[:N]
  return jnp.sum(nll_N * w_N), dx_NxD, dE_VxD, nll_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(x_NxD, emb_VxD, t_N, w_N, chunk: int):
  return _fwd(x_NxD, emb_VxD, t_N, w_N, chunk)[0]


def _vjp_fwd(x_NxD, emb_VxD, t_N, w_N, chunk: int):
  loss, dx, dE, nll = _fwd(x_NxD, emb_VxD, t_N, w_N, chunk)
  return loss, (dx, dE, nll, jnp.zeros((0,), x_NxD.dtype), jnp.zeros((0,), emb_VxD.dtype))


def _vjp_bwd(chunk: int, res, g):
  del chunk
  dx, dE, nll, x_tag, emb_tag = res  # zero-size tags carry the input dtypes through the residuals
  t_ct = np.zeros(nll.shape, jax.dtypes.float0)  # integer targets: no cotangent
  return (g * dx).astype(x_tag.dtype), (g * dE).astype(emb_tag.dtype), t_ct, g * nll


_weighted_nll_sum.defvjp(_vjp_fwd, _vjp_bwd)
