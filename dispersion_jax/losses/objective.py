"""The training objective: next-token cross-entropy + coeff * mean over selected layers of the dispersion loss."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dispersion_jax.losses.dispersion import DEFAULT_BLOCK_SIZE, IMPLS, VARIANTS, dispersion_loss
from dispersion_jax.losses.fused_ce import fused_cross_entropy
from dispersion_jax.models import hidden_states, lm_head

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
  """Mean over the selected layers of the dispersion loss, and the per-layer values."""
  per_layer = {}
  for i in select_layers(disp.loc, n_layer):
    key = None if rng is None else jax.random.fold_in(rng, i)  # reproducible per-layer token subsets
    per_layer[i] = dispersion_loss(
        states[i], key=key, mask=mask, segment_ids=segment_ids if disp.doc_mask else None, **disp.loss_kwargs()
    )
  return sum(per_layer.values()) / len(per_layer), per_layer


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
  logits, variables = model.apply(
      model_vars,
      batch["input_ids"],
      batch.get("positions"),
      deterministic=deterministic,
      embed_noise_alpha=embed_noise_alpha,
      segment_ids_BxL=batch.get("segment_ids"),  # used where model.cfg.document_mask is set
      rngs=rngs,
      mutable=["intermediates"],
  )
  if ce_chunk:  # fused head + CE (fused_ce.py): under jit the model's unused logits are dead code
    ce = fused_cross_entropy(
        hidden_states(variables)[-1],
        lm_head(params, model.cfg),
        batch["targets"],
        batch.get("loss_mask"),
        chunk=ce_chunk,
    )
  else:
    ce = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
  metrics = {"ce": ce}
  total = ce
  if coeff is not None or disp.coeff != 0.0:
    states = hidden_states(variables, disp.final_norm)
    disp_val, per_layer = dispersion_term(
        states,
        disp,
        model.cfg.n_layer,
        rng=disp_rng,
        mask=batch.get("dispersion_mask"),
        segment_ids=batch.get("segment_ids"),
    )
    c = disp.coeff if coeff is None else coeff
    total = ce + c * disp_val
    metrics["dispersion"] = disp_val if coeff is None else jnp.where(coeff != 0, disp_val, 0.0)
    metrics.update({f"dispersion/layer_{i}": v for i, v in per_layer.items()})
  else:
    metrics["dispersion"] = jnp.zeros((), ce.dtype)
  metrics["loss"] = total
  return total, metrics
