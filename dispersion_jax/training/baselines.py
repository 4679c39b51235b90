"""The paper's two other counter-condensation methods, as the authors' scripts run them (CE only):

- NEFTune-style embedding noise (`*_other_counter_condensation.py`, PerturbationTrainer.compute_loss): uniform
  noise in +-alpha / sqrt(L * D) added to the token-embedding output on training steps only, fresh per element,
  micro-batch and step: the models add it (models/neftune.py) when called with `embed_noise_alpha > 0`.
- Active forgetting (Chen et al. 2023, their ActiveForgettingCallback): after every K-th optimizer step the input
  embedding is re-drawn from N(0, std) with the pad row zeroed, and only its Adam moments and count are reset; it
  trains with its own learning-rate schedule (`forgetting_lr`, the authors' step indexing) in its own optimizer
  branch, while the rest of the model keeps its schedule. A tied output head is the same tensor, so it follows.

Exact semantics, with line references to the authors' code: shared/docs/qwen3-and-baselines.md, section 4.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

METHODS = ("none", "neftune", "active_forgetting")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  method: str = "none"  # none | neftune | active_forgetting
  neftune_alpha: float | None = None  # None = the family's default (GPT-2 1.0, Qwen3 5.0, as the authors' scripts)
  forget_every: int = 1000  # K: reset after every K-th optimizer step
  forget_emb_lr: float = 5e-5  # peak learning rate of the embedding branch (not scaled by world size)
  forget_emb_warmup: float = 0.08  # its warm-up, as a fraction of the run's steps
  forget_std: float = 0.02  # std of the re-drawn embedding
  pad_id: int | None = None  # the row zeroed at each reset; None = the tokenizer's EOS (their pad id)
  with_dispersion: bool = False  # allow dispersion.coeff != 0 beside a baseline (the authors' runs are CE only)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"baseline.method={self.method!r}: use one of {', '.join(METHODS)}")
    if self.neftune_alpha is not None and self.neftune_alpha < 0:
      raise ValueError(f"baseline.neftune_alpha={self.neftune_alpha} must be >= 0")
    if self.forget_every < 1:
      raise ValueError(f"baseline.forget_every={self.forget_every} must be >= 1")
    if not 0 <= self.forget_emb_warmup <= 1:
      raise ValueError(f"baseline.forget_emb_warmup={self.forget_emb_warmup} must be a fraction in [0, 1]")


@dataclasses.dataclass(frozen=True)
class Forgetting:
  """What the train step needs to reset the embedding (resolved from BaselineConfig and the model family)."""

  every: int
  std: float
  pad_id: int | None
  embed_path: tuple[str, ...]


def forgetting_lr(cfg: BaselineConfig, steps: int) -> optax.Schedule:
  """The embedding branch's learning rate at optax count c (= optimizer step c + 1, so the authors' scheduler
  index `le` equals c): e = ((c + 1) * (T // K)) % T; linear warm-up over int(warmup * T) steps, then linear
  decay to 0 at T. T < K gives T // K = 0, so e = 0 and the rate is 0 for the whole run (their schedule freezes
  the embedding then, and no reset ever fires)."""
  T, K = steps, cfg.forget_every
  speed, warm = T // K, int(cfg.forget_emb_warmup * T)

  def schedule(count):
    e = ((count + 1) * speed) % T
    mult = jnp.where(e < warm, e / max(1, warm), jnp.maximum(0.0, (T - e) / max(1, T - warm)))
    return cfg.forget_emb_lr * mult

  return schedule


def embed_labels(params, embed_path: tuple[str, ...]):
  """optax.multi_transform labels: "embed" for the input-embedding leaf, "body" for every other parameter."""

  def label(path, _):
    return "embed" if tuple(getattr(p, "key", None) for p in path) == embed_path else "body"

  return jax.tree_util.tree_map_with_path(label, params)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def reset_embedding(params, opt_state, key: jax.Array, *, embed_path: tuple[str, ...], std: float, pad_id: int | None):
  """(params, opt_state) after a reset: the input embedding ~ N(0, std) with row pad_id zeroed, and the Adam
  moments and count of the embedding branch zeroed. The branch's schedule count is left alone: the embedding
  learning rate is a function of the global step, not of the time since the reset."""
  old = _get(params, embed_path)
  fresh = (std * jax.random.normal(key, old.shape, jnp.float32)).astype(old.dtype)
  if pad_id is not None:
    fresh = fresh.at[pad_id].set(0)
  params = _set(params, embed_path, fresh)

  def zero_adam(state):
    if isinstance(state, optax.ScaleByAdamState):
      return state._replace(
          count=jnp.zeros_like(state.count),
          mu=jax.tree.map(jnp.zeros_like, state.mu),
          nu=jax.tree.map(jnp.zeros_like, state.nu),
      )
    return state

  def reset_branch(state):
    if isinstance(state, optax.MultiTransformState):
      inner = dict(state.inner_states)
      inner["embed"] = jax.tree.map(zero_adam, inner["embed"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
      return state._replace(inner_states=inner)
    return state

  opt_state = jax.tree.map(reset_branch, opt_state, is_leaf=lambda s: isinstance(s, optax.MultiTransformState))
  return params, opt_state
