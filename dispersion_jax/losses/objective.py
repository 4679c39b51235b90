"""The training objective: next-token cross-entropy + coeff * mean over selected layers of the dispersion loss."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dispersion_jax.losses.dispersion import DEFAULT_BLOCK_SIZE, IMPLS, VARIANTS, dispersion_loss
from dispersion_jax.losses.fused_ce import fused_cross_entropy
from dispersion_jax.models import final_state, lm_head
from dispersion_jax.models.layer_term import LayerTerm, layer_terms

LOCS = ("all", "last", "early_half", "late_half")
_NOISE_STREAM = 0x6E6F6973  # fold_in constant of the embedding-noise stream ("nois")
_LORA_STREAM = 0x6C647270  # fold_in constant of the LoRA-dropout stream ("ldrp")


@dataclasses.dataclass(frozen=True)
class DispersionConfig:
  variant: str = "angular_spread"
  coeff: float = 0.0  # 0 = off (the term is not computed); the paper uses 0.1
  loc: str = "all"
  tau_l2: float = 1.0
  tau_cos: float = 1.0
  margin: float = 0.5
  epsilon: float = 1e-2
  clamp_threshold: float = 0.25
  max_tokens: int | None = None  # None = all tokens
  doc_mask: bool = False  # exclude pairs across documents (needs batch["segment_ids"])
  block_size: int | None = DEFAULT_BLOCK_SIZE  # rows per checkpointed block (dense up to L=512); None = dense
  final_norm: bool = True  # last layer after the final norm (Hugging Face); False: raw block output
  impl: str = "auto"  # auto | xla (the exact reformulation) | pallas (Mosaic GPU kernel) | reference

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"dispersion.variant={self.variant!r}: use one of {', '.join(VARIANTS)}")
    if self.loc not in LOCS:
      raise ValueError(f"dispersion.loc={self.loc!r}: use one of {', '.join(LOCS)}")
    if self.tau_cos <= 0 or self.tau_l2 <= 0:
      raise ValueError("dispersion.tau_cos and dispersion.tau_l2 must be > 0")
    if self.impl not in IMPLS:
      raise ValueError(f"dispersion.impl={self.impl!r}: use one of {', '.join(IMPLS[:4])}")
    if self.max_tokens is not None and self.max_tokens < 2:
      raise ValueError(f"dispersion.max_tokens={self.max_tokens} must be >= 2 or None (all tokens)")

  def loss_kwargs(self) -> dict[str, Any]:
    return dict(
        variant=self.variant,
        tau_l2=self.tau_l2,
        tau_cos=self.tau_cos,
        margin=self.margin,
        epsilon=self.epsilon,
        clamp_threshold=self.clamp_threshold,
        max_tokens=self.max_tokens,
        block_size=self.block_size,
        impl=self.impl,
    )


def select_layers(loc: str, n_layer: int) -> tuple[int, ...]:
  """Hidden-state indices (1..n_layer; 0, the embedding output, is never dispersed)."""
  idx = tuple(range(1, n_layer + 1))
  half = max(1, n_layer // 2)
  if loc == "all":
    return idx
  if loc == "last":
    return idx[-1:]
  if loc == "early_half":
    return idx[:half]
  if loc == "late_half":
    return idx[half:] or idx[-1:]
  raise ValueError(f"dispersion.loc={loc!r}: use one of {', '.join(LOCS)}")


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL=None):
  """Mean next-token cross-entropy in float32 (or wider) over positions with weight > 0."""
  logits = logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype, jnp.float32))
  logz_BxL = jax.nn.logsumexp(logits, axis=-1)
  tgt_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = logz_BxL - tgt_BxL
  w = jnp.ones_like(nll_BxL) if weights_BxL is None else weights_BxL.astype(nll_BxL.dtype)
  return jnp.sum(nll_BxL * w) / jnp.maximum(jnp.sum(w), 1.0)


def dispersion_term(
    states: tuple[jax.Array, ...],
    disp: DispersionConfig,
    n_layer: int,
    *,
    rng: jax.Array | None = None,
    mask=None,
    segment_ids=None,
):
  """Mean over the selected layers of the dispersion loss of sown `states`, and the per-layer values (the
  evaluation step's path; training computes the same values inside the layer loop, `objective`)."""
  inputs = (rng, mask, segment_ids)
  return _mean({i: _layer_dispersion(disp, states[i], i, inputs) for i in select_layers(disp.loc, n_layer)})


def _mean(per_layer: dict[int, jax.Array]):
  return sum(per_layer[i] for i in sorted(per_layer)) / len(per_layer), per_layer


def _layer_dispersion(disp: DispersionConfig, h_BxLxD, index, inputs):
  """The dispersion loss of hidden state `index` (a LayerTerm fn: inside the layer loop, or on the final norm)."""
  rng, mask, segment_ids = inputs
  key = None if rng is None else jax.random.fold_in(rng, index)  # reproducible per-layer token subsets
  return dispersion_loss(
      h_BxLxD, key=key, mask=mask, segment_ids=segment_ids if disp.doc_mask else None, **disp.loss_kwargs()
  )


def objective(
    params,
    batch: dict,
    *,
    model,
    disp: DispersionConfig,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    coeff: jax.Array | None = None,
    ce_chunk: int | None = None,
    embed_noise_alpha: float = 0.0,
    adapters: dict | None = None,
):
  """Returns (total, metrics). batch: input_ids, targets [B, L]; optional loss_mask, segment_ids, positions.

  rng: folded into a `dropout` and a `dispersion` stream (token subsampling); None where neither is used.
  coeff: a traced coefficient replacing disp.coeff (vmapped sweeps); the term is then always computed.
  ce_chunk: fused output head + CE in chunks of this many tokens (fused_ce.py); None = plain logits + CE.
  embed_noise_alpha: NEFTune-style noise on the embedding output (baselines.py; training steps only), drawn from a
  `noise` stream of rng (folded in, so the dropout and dispersion streams are the same as without it).
  adapters: LoRA (lora.py): the model's `lora` collection ({"a", "b"} per adapted layer, B already scaled by
  alpha / r) beside the frozen `params`; with rng and model.cfg.lora_dropout > 0 a `lora` stream drives PEFT's
  dropout on the adapters' input (folded in: the other streams are the same as without it).
  metrics["dispersion"] is 0 where the coefficient is 0 (the term is off); validation always measures it.
  The term of each block's output is computed inside the layer loop, under the block's remat policy
  (models/layer_term.py): the same values and gradients as `dispersion_term` over the sown states (tested), at one
  layer's memory. With remat its forward is recomputed in the backward pass, as the block's activations are.
  """
  rngs = {}
  disp_rng = None
  if rng is not None:
    rngs["dropout"], disp_rng = jax.random.split(rng)
  if embed_noise_alpha:
    if rng is None:
      raise ValueError("embed_noise_alpha > 0 needs an rng")
    rngs["noise"] = jax.random.fold_in(rng, _NOISE_STREAM)
  model_vars = {"params": params}
  if adapters is not None:
    model_vars["lora"] = adapters
    if rng is not None and getattr(model.cfg, "lora_dropout", 0.0) > 0:
      rngs["lora"] = jax.random.fold_in(rng, _LORA_STREAM)
  with_term = coeff is not None or disp.coeff != 0.0
  n_layer = model.cfg.n_layer
  layers = select_layers(disp.loc, n_layer)
  # Hidden states 1..n-1 (and n without the final norm) are block outputs: their terms run inside the layer loop
  # (models/layer_term.py), so no layer's state outlives its block. The final norm's output is outside the loop.
  after_loop = (n_layer,) if disp.final_norm and n_layer in layers else ()
  term_inputs = (disp_rng, batch.get("dispersion_mask"), batch.get("segment_ids"))
  term = functools.partial(_layer_dispersion, disp)
  in_loop = tuple(i for i in layers if i not in after_loop)
  layer_term = LayerTerm(term, in_loop, term_inputs) if with_term and in_loop else None
  logits, variables = model.apply(
      model_vars,
      batch["input_ids"],
      batch.get("positions"),
      deterministic=deterministic,
      embed_noise_alpha=embed_noise_alpha,
      segment_ids_BxL=batch.get("segment_ids"),  # used where model.cfg.document_mask is set
      layer_term=layer_term,
      rngs=rngs,
      mutable=["intermediates"],
  )
  if ce_chunk:  # fused head + CE (fused_ce.py): under jit the model's unused logits are dead code
    ce = fused_cross_entropy(
        final_state(variables),
        lm_head(params, model.cfg),
        batch["targets"],
        batch.get("loss_mask"),
        chunk=ce_chunk,
    )
  else:
    ce = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
  metrics = {"ce": ce}
  total = ce
  if with_term:
    per_layer = layer_terms(variables, in_loop) if in_loop else {}
    for i in after_loop:
      per_layer[i] = term(final_state(variables), i, term_inputs)
    disp_val, per_layer = _mean(per_layer)
    c = disp.coeff if coeff is None else coeff
    total = ce + c * disp_val
    metrics["dispersion"] = disp_val if coeff is None else jnp.where(coeff != 0, disp_val, 0.0)
    metrics.update({f"dispersion/layer_{i}": v for i, v in per_layer.items()})
  else:
    metrics["dispersion"] = jnp.zeros((), ce.dtype)
  metrics["loss"] = total
  return total, metrics
