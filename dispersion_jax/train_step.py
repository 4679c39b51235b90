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

from dispersion_jax import sharding
from dispersion_jax.baselines import Forgetting, reset_embedding
from dispersion_jax.condensation import condensation_metrics
from dispersion_jax.models import hidden_states, init_params, param_logical_axes
from dispersion_jax.objective import DispersionConfig, cross_entropy, dispersion_term, objective

_FORGET_STREAM = 0x666F7267  # fold_in constant of the embedding re-draws ("forg")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(model_cfg, tx: optax.GradientTransformation, seed: int, params=None) -> TrainState:
  rng_params, rng_train = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = init_params(model_cfg, rng_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng_train)


def state_shardings(model_cfg, tx: optax.GradientTransformation, mesh: Mesh):
  """(abstract state, its NamedShardings): optimizer moments follow their parameters' placement.

  The abstract state's leaves are jax.ShapeDtypeStructs that carry their sharding: a restore or compile target.
  """
  abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, 0))
  p_shard = sharding.param_shardings(param_logical_axes(model_cfg), abstract.params, mesh)
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
  shard = TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)
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
):
  """One optimizer step over `grad_accum` equal micro-batches.

  Each micro-batch's objective is CE-mean + coeff * dispersion-mean; averaging the micro-batches keeps the
  relative weight of the two terms (the meaning of `coeff`) independent of `grad_accum`. `coeff`: a traced
  coefficient replacing disp.coeff (one compiled step for models that differ only in it, see vmap_train.py).
  embed_noise_alpha: NEFTune-style noise, fresh per micro-batch (its key folds in the step and the micro-batch).
  forgetting: active forgetting (baselines.py): after every `every`-th step the input embedding is re-drawn and its
  optimizer branch's Adam state reset, inside this step, so the state after step K (and a checkpoint of it) already
  holds the fresh embedding and a resume is exact across a reset.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  deterministic = getattr(model.cfg, "dropout", 0.0) == 0.0
  grad_fn = jax.value_and_grad(
      lambda p, b, r: objective(
          p,
          b,
          model=model,
          disp=disp,
          rng=r,
          deterministic=deterministic,
          coeff=coeff,
          ce_chunk=ce_chunk,
          embed_noise_alpha=embed_noise_alpha,
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


def eval_step(params, batch: dict, *, model: nn.Module, disp: DispersionConfig, with_dispersion: bool = True):
  """Sums over the batch (tokens weighted by segment_ids > 0, padding excluded) for exact reduction."""
  logits, variables = model.apply(
      {"params": params}, batch["input_ids"], batch.get("positions"), mutable=["intermediates"]
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
