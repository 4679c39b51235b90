"""Embedding condensation: per-layer token-token cosine similarity statistics (the paper's diagnostic).

For every hidden state (HF order: 0 = embedding output ... n_layer = final block after ln_f) and every text, the
[n, n] cosine matrix of its n real tokens is reduced on device to its mean (diagonal included, the authors'
convention), its off-diagonal mean and a histogram over [-1, 1]; the host keeps running sums only. The headline
statistic is the rank correlation (Spearman, Kendall) of the per-layer mean with the layer index: positive =
similarity grows with depth = condensation.

`condensation_metrics` is the cheap jit-able variant for training-time logging on a fixed validation batch.
CLI: `python -m dispersion_jax condensation --help` (implemented in condensation_cli.py).
"""

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from dispersion_jax.models import build_model, hidden_states

NUM_BINS = 100
_EPS = 1e-12  # norm floor: an all-zero token vector gets cosine 0 with everything instead of NaN


# ----------------------------------------------------------------------------------------------- device part
def cosine_matrix(h_BxLxD: jax.Array) -> jax.Array:
  """[B, L, L] token-token cosine similarity within each sequence, float32 or wider, clipped to [-1, 1]."""
  h_BxLxD = h_BxLxD.astype(jnp.promote_types(h_BxLxD.dtype, jnp.float32))
  norm_BxLx1 = jnp.linalg.norm(h_BxLxD, axis=-1, keepdims=True)
  hn_BxLxD = h_BxLxD / jnp.maximum(norm_BxLx1, _EPS)
  # HIGHEST: no TF32 on GPU, near-1 cosines need the mantissa.
  cos_BxLxL = jnp.einsum("bld,bmd->blm", hn_BxLxD, hn_BxLxD, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(cos_BxLxL, -1.0, 1.0)


def _full_mask(h_BxLxD: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
  return jnp.ones(h_BxLxD.shape[:2], bool) if mask_BxL is None else mask_BxL.astype(bool)


def text_means(cos_BxLxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per text: mean over its n*n entries (with diagonal), mean over i != j (0 where n < 2), n."""
  m_BxL = mask_BxL.astype(cos_BxLxL.dtype)
  n_B = m_BxL.sum(-1)
  total_B = jnp.einsum("blm,bl,bm->b", cos_BxLxL, m_BxL, m_BxL)
  diag_B = jnp.sum(jnp.diagonal(cos_BxLxL, axis1=1, axis2=2) * m_BxL, axis=-1)
  mean_B = total_B / jnp.maximum(n_B * n_B, 1.0)
  offdiag_B = (total_B - diag_B) / jnp.maximum(n_B * (n_B - 1.0), 1.0)
  return mean_B, offdiag_B, n_B


def bin_edges(num_bins: int = NUM_BINS) -> np.ndarray:
  return np.linspace(-1.0, 1.0, num_bins + 1)


def histogram_counts(cos_BxLxL: jax.Array, mask_BxL: jax.Array, num_bins: int = NUM_BINS) -> jax.Array:
  """[num_bins] int32 counts of the real-token entries (diagonal included), binned exactly like np.histogram."""
  edges_K1 = jnp.asarray(bin_edges(num_bins), cos_BxLxL.dtype)
  c = cos_BxLxL.reshape(-1)
  idx = jnp.clip(jnp.floor((c + 1.0) * (num_bins / 2.0)).astype(jnp.int32), 0, num_bins - 1)
  # numpy's edge correction: a value that rounding put in the neighbouring bin is moved back.
  idx = idx - (c < edges_K1[idx]).astype(jnp.int32)
  idx = idx + ((c >= edges_K1[idx + 1]) & (idx != num_bins - 1)).astype(jnp.int32)
  pair_BxLxL = mask_BxL[:, :, None] & mask_BxL[:, None, :]
  return jnp.bincount(idx, weights=pair_BxLxL.reshape(-1).astype(jnp.int32), length=num_bins)


def batch_statistics(
    states: Sequence[jax.Array], mask_BxL: jax.Array | None = None, num_bins: int = NUM_BINS
) -> dict[str, jax.Array]:
  """One batch, all layers (N = len(states)): per-text means [N, B], counts [N, K], tokens per text [B]."""
  mask_BxL = _full_mask(states[0], mask_BxL)
  means, offdiags, counts = [], [], []
  for h_BxLxD in states:  # one [B, L, L] matrix alive at a time
    cos_BxLxL = cosine_matrix(h_BxLxD)
    mean_B, offdiag_B, n_B = text_means(cos_BxLxL, mask_BxL)
    means.append(mean_B)
    offdiags.append(offdiag_B)
    counts.append(histogram_counts(cos_BxLxL, mask_BxL, num_bins))
  return {
      "mean_NxB": jnp.stack(means),
      "offdiag_NxB": jnp.stack(offdiags),
      "counts_NxK": jnp.stack(counts),
      "num_tokens_B": n_B.astype(jnp.int32),
  }


def rank_correlation_jnp(y_N: jax.Array) -> jax.Array:
  """Spearman correlation of y with 0..N-1 (average ranks for ties, like scipy), jit-able; NaN if y is constant."""
  y_N = y_N.astype(jnp.promote_types(y_N.dtype, jnp.float32))
  less_NxN = (y_N[None, :] < y_N[:, None]).sum(-1)
  equal_NxN = (y_N[None, :] == y_N[:, None]).sum(-1)
  rank_N = less_NxN + (equal_NxN + 1) / 2.0  # 1-based average rank
  x_N = jnp.arange(y_N.shape[0], dtype=rank_N.dtype)
  rc, xc = rank_N - rank_N.mean(), x_N - x_N.mean()
  return jnp.sum(rc * xc) / jnp.sqrt(jnp.sum(rc * rc) * jnp.sum(xc * xc))


def condensation_metrics(states: Sequence[jax.Array], mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Training-time logging: per-layer mean cosine (diagonal included, mean over texts) and its Spearman vs depth.

  Call inside or right after a jitted eval step with `hidden_states(variables)` of a fixed validation batch.
  Keys: `condensation/mean_cos/layer_{i}`, `condensation/spearman`.
  """
  mask_BxL = _full_mask(states[0], mask)
  valid_B = None
  means = []
  for h_BxLxD in states:
    mean_B, _, n_B = text_means(cosine_matrix(h_BxLxD), mask_BxL)
    valid_B = (n_B > 0).astype(mean_B.dtype)  # an all-padding row does not count as a text
    means.append(jnp.sum(mean_B * valid_B) / jnp.maximum(valid_B.sum(), 1.0))
  m_N = jnp.stack(means)
  out = {f"condensation/mean_cos/layer_{i}": m for i, m in enumerate(means)}
  out["condensation/spearman"] = rank_correlation_jnp(m_N)
  return out


# ------------------------------------------------------------------------------------------------- host part
def _nan_to_none(x: float) -> float | None:
  return None if math.isnan(x) else float(x)


def spearman(values: Mapping[str, Any] | Sequence[float]) -> float:
  """Spearman correlation of per-layer values with the layer index (host side, scipy).

  Accepts a sequence ordered by layer or a `condensation_metrics` dict (its mean_cos keys).
  """
  if isinstance(values, Mapping):
    prefix = "condensation/mean_cos/layer_"
    layers = sorted((int(k[len(prefix) :]), v) for k, v in values.items() if k.startswith(prefix))
    values = [v for _, v in layers]
  y = np.asarray([float(v) for v in values], np.float64)
  if len(y) < 2 or np.all(y == y[0]):
    return float("nan")
  return float(scipy.stats.spearmanr(np.arange(len(y)), y).statistic)


def kendall(values: Sequence[float]) -> float:
  y = np.asarray([float(v) for v in values], np.float64)
  if len(y) < 2 or np.all(y == y[0]):
    return float("nan")
  return float(scipy.stats.kendalltau(np.arange(len(y)), y).statistic)


def init_totals(num_layers: int, num_bins: int = NUM_BINS) -> dict[str, Any]:
  """Running sums over texts (host, float64 / int64); no per-text matrix is kept."""
  return {
      "sum_mean_N": np.zeros(num_layers),
      "sum_offdiag_N": np.zeros(num_layers),
      "num_texts": 0,
      "num_texts_offdiag": 0,
      "num_tokens": 0,
      "counts_NxK": np.zeros((num_layers, num_bins), np.int64),
  }


def add_batch(totals: dict[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  """Fold one `batch_statistics` result in; rows with no real token (batch padding) are ignored."""
  n_B = np.asarray(stats["num_tokens_B"])
  valid_B, pairs_B = n_B > 0, n_B > 1
  return {
      "sum_mean_N": totals["sum_mean_N"] + np.asarray(stats["mean_NxB"], np.float64)[:, valid_B].sum(-1),
      "sum_offdiag_N": totals["sum_offdiag_N"] + np.asarray(stats["offdiag_NxB"], np.float64)[:, pairs_B].sum(-1),
      "num_texts": totals["num_texts"] + int(valid_B.sum()),
      "num_texts_offdiag": totals["num_texts_offdiag"] + int(pairs_B.sum()),
      "num_tokens": totals["num_tokens"] + int(n_B.sum()),
      "counts_NxK": totals["counts_NxK"] + np.asarray(stats["counts_NxK"], np.int64),
  }


def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
  """JSON-ready statistics: per-layer means, histograms and rank correlations with depth (None where undefined)."""
  if totals["num_texts"] == 0:
    raise ValueError("no text with at least one token: nothing to measure")
  mean_N = totals["sum_mean_N"] / totals["num_texts"]
  offdiag_N = totals["sum_offdiag_N"] / max(totals["num_texts_offdiag"], 1)
  counts_NxK = totals["counts_NxK"]
  edges = bin_edges(counts_NxK.shape[1])
  density_NxK = counts_NxK / np.maximum(counts_NxK.sum(-1, keepdims=True), 1) / np.diff(edges)
  return {
      "num_layers": int(len(mean_N)),
      "num_texts": int(totals["num_texts"]),
      "num_tokens": int(totals["num_tokens"]),
      "mean_cossim_by_layer": mean_N.tolist(),
      "mean_cossim_by_layer_offdiag": offdiag_N.tolist(),
      "spearman": _nan_to_none(spearman(mean_N)),
      "kendall": _nan_to_none(kendall(mean_N)),
      "spearman_offdiag": _nan_to_none(spearman(offdiag_N)),
      "kendall_offdiag": _nan_to_none(kendall(offdiag_N)),
      "histograms": {"bin_edges": edges.tolist(), "counts": counts_NxK.tolist(), "density": density_NxK.tolist()},
  }


# ------------------------------------------------------------------------------------------- model driver
def length_bucket(n: int, cap: int) -> int:
  """Smallest power of two >= n (at least 16), capped: a handful of compiled shapes."""
  return min(cap, max(16, 1 << (max(n, 1) - 1).bit_length()))


@functools.cache
def _stats_fn(cfg, num_bins: int):
  model = build_model(cfg)

  @jax.jit
  def fn(params, ids_BxL, mask_BxL):
    # The LM head is dead code here (only hidden states are used): XLA drops it.
    _, variables = model.apply({"params": params}, ids_BxL, mutable=["intermediates"])
    return batch_statistics(hidden_states(variables), mask_BxL, num_bins)

  return fn


def check_token_ids(token_lists: Sequence[Sequence[int]], vocab_size: int) -> None:
  for i, ids in enumerate(token_lists):
    lo, hi = min(ids, default=0), max(ids, default=0)
    if lo < 0 or hi >= vocab_size:
      raise ValueError(
          f"text {i} has token id {hi if hi >= vocab_size else lo} outside the model vocabulary "
          f"[0, {vocab_size}): wrong tokenizer for this model?"
      )


def model_statistics(
    cfg,
    params: Any,
    token_lists: Sequence[Sequence[int]],
    *,
    max_length: int,
    batch_size: int = 8,
    num_bins: int = NUM_BINS,
) -> dict[str, Any]:
  """Condensation summary of `params` over texts given as token-id lists (truncated to max_length/n_positions)."""
  if max_length < 1 or batch_size < 1:
    raise ValueError(f"max_length={max_length} and batch_size={batch_size} must be >= 1")
  check_token_ids(token_lists, cfg.vocab_size)
  cap = min(max_length, cfg.n_positions)
  texts = sorted((list(t)[:cap] for t in token_lists if len(t)), key=len)  # similar lengths share a batch
  if not texts:
    raise ValueError("all texts are empty after tokenization")
  fn = _stats_fn(cfg, num_bins)
  params = jax.device_put(params)  # once, not per batch
  totals = init_totals(cfg.n_layer + 1, num_bins)
  for start in range(0, len(texts), batch_size):
    chunk = texts[start : start + batch_size]
    L = length_bucket(len(chunk[-1]), cap)
    ids_BxL = np.zeros((batch_size, L), np.int32)  # fixed batch: padding rows are all-mask-zero
    mask_BxL = np.zeros((batch_size, L), bool)
    for b, ids in enumerate(chunk):
      ids_BxL[b, : len(ids)], mask_BxL[b, : len(ids)] = ids, True
    # Right padding: the model is causal, so real tokens never see the padding.
    totals = add_batch(totals, jax.device_get(fn(params, ids_BxL, mask_BxL)))
  out = summarize(totals)
  out["settings"] = {
      "max_length": cap,
      "batch_size": batch_size,
      "num_bins": num_bins,
      "n_layer": cfg.n_layer,
      "n_embd": cfg.n_embd,
      "vocab_size": cfg.vocab_size,
  }
  return out
