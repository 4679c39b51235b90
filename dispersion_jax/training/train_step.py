"""The train state and the jitted, sharded train / eval steps."""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dispersion_jax.evaluation.condensation import condensation_metrics
from dispersion_jax.losses.objective import DispersionConfig, cross_entropy, dispersion_term, objective
from dispersion_jax.models import hidden_states, init_params, lora, param_logical_axes
from dispersion_jax.parallel import sharding
from dispersion_jax.training.baselines import Forgetting, reset_embedding

_FORGET_STREAM = 0x666F7267  # fold_in constant of the embedding re-draws ("forg")


@flax.struct.dataclass
class TrainState:
  """`params` are what trains: the model's parameters, or with LoRA the adapters (lora.py), whose frozen base
  weights are then `frozen` (no gradient, no optimizer state; left out of checkpoints: `trainable`)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None


def base_params(model_cfg, seed):
  """The fresh initialisation of a run's model weights (what init_state draws for `seed`)."""
  return init_params(model_cfg, jax.random.split(jax.random.PRNGKey(seed))[0])


def init_state(
    model_cfg, tx: optax.GradientTransformation, seed: int, params=None, lora_spec=None, adapters=None
) -> TrainState:
  """The state at step 0. With a LoraSpec the model weights (`params`, or a fresh initialisation) are frozen and
  the adapters train: `adapters` (e.g. a PEFT file's), or A ~ PEFT's init and B = 0."""
  rng_params, rng_train = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = init_params(model_cfg, rng_params)
  if lora_spec is None:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng_train)
  if adapters is None:
    adapters = lora.init_adapters(lora_spec, params, rng_params)
  return TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters), rng_train, frozen=params)


def trainable(state: TrainState) -> TrainState:
  """What a checkpoint holds: everything but LoRA's frozen base (a fingerprint of it is saved instead)."""
  return state.replace(frozen=None)


def state_shardings(model_cfg, tx: optax.GradientTransformation, mesh: Mesh, lora_spec=None):
  """(abstract state, its NamedShardings): optimizer moments follow their parameters' placement; LoRA adapters
  follow their base weight's (lora.adapter_logical_axes), the frozen base is placed as the parameters would be.

  The abstract state's leaves are jax.ShapeDtypeStructs that carry their sharding: a restore or compile target.
  """
  abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, 0, lora_spec=lora_spec))
  axes = param_logical_axes(model_cfg)
  frozen_shard = None
  if lora_spec is not None:
    frozen_shard = sharding.param_shardings(axes, abstract.frozen, mesh)
    axes = lora.adapter_logical_axes(lora_spec, axes)
  p_shard = sharding.param_shardings(axes, abstract.params, mesh)
  rep = sharding.replicated(mesh)
  # Optax states hold copies of the param tree (mu, nu); anything else (counts) is replicated.
  # Masked branches (multi_transform, active forgetting) hold MaskedNode where a parameter is not theirs.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shard = optax.tree_map_params(
      tx,
      lambda x, s: x if masked(x) else s,
      abstract.opt_state,
      p_shard,
      transform_non_params=lambda _: rep,
      is_leaf=masked,
  )
  shard = TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep, frozen=frozen_shard)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
  return abstract, shard


def _microbatches(batch: dict, n: int) -> dict:
  return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(
    state: TrainState,
    batch: dict,
    coeff: jax.Array | None = None,
    *,
    model: nn.Module,
    disp: DispersionConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    ce_chunk: int | None = None,
    embed_noise_alpha: float = 0.0,
    forgetting: Forgetting | None = None,
    lora_scale: float | None = None,
):
  """One optimizer step over `grad_accum` equal micro-batches.

  Each micro-batch's objective is CE-mean + coeff * dispersion-mean; averaging the micro-batches keeps the
  relative weight of the two terms (the meaning of `coeff`) independent of `grad_accum`. `coeff`: a traced
  coefficient replacing disp.coeff (one compiled step for models that differ only in it, see vmap_train.py).
  embed_noise_alpha: NEFTune-style noise, fresh per micro-batch (its key folds in the step and the micro-batch).
  forgetting: active forgetting (baselines.py): after every `every`-th step the input embedding is re-drawn and its
  optimizer branch's Adam state reset, inside this step, so the state after step K (and a checkpoint of it) already
  holds the fresh embedding and a resume is exact across a reset.
  lora_scale: alpha / r of a LoRA state (state.frozen holds the base): only the adapters are differentiated.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  deterministic = getattr(model.cfg, "dropout", 0.0) == 0.0
  if (state.frozen is None) != (lora_scale is None):
    raise ValueError("a LoRA state (frozen base weights) needs lora_scale, and lora_scale needs a LoRA state")
  # With LoRA the differentiated argument is the adapters; the base is closed over, never differentiated.
  model_args = (lambda p: (p, None)) if lora_scale is None else (lambda p: (state.frozen, lora.scaled(p, lora_scale)))
  grad_fn = jax.value_and_grad(
      lambda p, b, r: objective(
          model_args(p)[0],
          b,
          model=model,
          disp=disp,
          rng=r,
          deterministic=deterministic,
          coeff=coeff,
          ce_chunk=ce_chunk,
          embed_noise_alpha=embed_noise_alpha,
          adapters=model_args(p)[1],
      ),
      has_aux=True,
  )

  def micro(carry, xs):
    i, mb = xs
    (_, metrics), grads = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  mbs = _microbatches(batch, grad_accum)
  if grad_accum == 1:
    (grads, metrics), _ = micro(_zeros_like_out(grad_fn, state.params, batch, step_rng), (0, batch))
  else:
    init = _zeros_like_out(grad_fn, state.params, jax.tree.map(lambda x: x[0], mbs), step_rng)
    (grads, metrics), _ = jax.lax.scan(micro, init, (jnp.arange(grad_accum), mbs))
    grads, metrics = jax.tree.map(lambda x: x / grad_accum, (grads, metrics))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if forgetting is not None:
    step = state.step + 1
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _FORGET_STREAM), step)
    reset = functools.partial(
        reset_embedding, key=key, embed_path=forgetting.embed_path, std=forgetting.std, pad_id=forgetting.pad_id
    )
    params, opt_state = jax.lax.cond(
        step % forgetting.every == 0, lambda p, o: reset(p, o), lambda p, o: (p, o), params, opt_state
    )
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _zeros_like_out(grad_fn, params, mb, rng):
  (_, metrics), grads = jax.eval_shape(grad_fn, params, mb, rng)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads, metrics))


def eval_step(
    params,
    batch: dict,
    *,
    model: nn.Module,
    disp: DispersionConfig,
    with_dispersion: bool = True,
    lora_scale: float | None = None,
):
  """Sums over the batch (tokens weighted by segment_ids > 0, padding excluded) for exact reduction.
  With lora_scale, `params` is (frozen base, adapters): the adapters run in their layers, nothing is merged."""
  model_vars = (
      {"params": params} if lora_scale is None else {"params": params[0], "lora": lora.scaled(params[1], lora_scale)}
  )
  logits, variables = model.apply(
      model_vars,
      batch["input_ids"],
      batch.get("positions"),
      segment_ids_BxL=batch.get("segment_ids"),  # used where model.cfg.document_mask is set
      mutable=["intermediates"],
  )
  w_BxL = (
      (batch["segment_ids"] > 0).astype(jnp.float32)
      if "segment_ids" in batch
      else jnp.ones(batch["input_ids"].shape, jnp.float32)
  )
  n_tok = jnp.sum(w_BxL)
  out = {"ce_sum": cross_entropy(logits, batch["targets"], w_BxL) * n_tok, "tokens": n_tok}
  if with_dispersion:
    states = hidden_states(variables, disp.final_norm)
    disp_full = dataclasses.replace(disp, max_tokens=None)  # all tokens: a stable estimate
    val, _ = dispersion_term(states, disp_full, model.cfg.n_layer, mask=w_BxL > 0, segment_ids=batch.get("segment_ids"))
    out["dispersion_sum"] = val
    out["batches"] = jnp.ones(())
    out.update(condensation_metrics(states, mask=w_BxL > 0))
  return out


def eval_params(state):
  """eval_step's weights argument: the params, or (frozen base, adapters) for LoRA (validation.jit_eval_step)."""
  return state.params if state.frozen is None else (state.frozen, state.params)


def jit_train_step(fn: Callable, mesh: Mesh, shardings: TrainState):
  batch_shard = sharding.batch_sharding(mesh)
  return jax.jit(
      fn,
      in_shardings=(shardings, batch_shard),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )


@contextlib.contextmanager
def logical_context(mesh: Mesh):
  """Mesh + logical rules, so the model's activation constraints bind while tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield
