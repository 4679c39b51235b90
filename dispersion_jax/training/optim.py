"""The Optax optimizer of a run: AdamW with warm-up + cosine decay, global-norm clipping, a decay mask; for active
forgetting (baselines.py) the input embedding gets its own AdamW branch with its own schedule."""

import dataclasses
import functools

import jax
import optax

from dispersion_jax.training.baselines import BaselineConfig, embed_labels, forgetting_lr


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-4
  warmup: float = 0.1  # < 1: fraction of the run's steps; >= 1: number of steps
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = True  # biases and norm scales are never decayed
  clip: float | None = 1.0  # global gradient norm; None (or 0) = off

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f"optimizer.lr={self.lr} must be > 0")
    if self.warmup < 0:
      raise ValueError(f"optimizer.warmup={self.warmup} must be >= 0")
    if self.clip is not None and self.clip < 0:
      raise ValueError(f"optimizer.clip={self.clip} must be > 0 or None (off)")


def warmup_steps(opt: OptimizerConfig, steps: int) -> int:
  warmup = int(round(opt.warmup * steps)) if opt.warmup < 1 else int(opt.warmup)
  return min(warmup, steps)


def lr_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
  warmup = warmup_steps(opt, steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, opt.lr, warmup, max(steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio
  )


def decay_mask(params, decay_embeddings: bool):
  """Decay matrices only: never biases or norm scales; embeddings if the recipe says so."""

  def keep(path, _):
    names = [getattr(p, "key", "") for p in path]
    if names[-1] in ("bias", "scale"):
      return False
    return decay_embeddings or names[-1] != "embedding"

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    opt: OptimizerConfig, steps: int, baseline: BaselineConfig | None = None, embed_path: tuple[str, ...] | None = None
) -> optax.GradientTransformation:
  """AdamW (+ clipping over all parameters). With baseline.method == "active_forgetting" the leaf at `embed_path`
  trains in its own branch (`multi_transform`): same AdamW, the forgetting learning-rate schedule."""

  def adamw(schedule):
    return optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=functools.partial(decay_mask, decay_embeddings=opt.decay_embeddings),
    )

  tx = adamw(lr_schedule(opt, steps))
  if baseline is not None and baseline.method == "active_forgetting":
    tx = optax.multi_transform(
        {"body": tx, "embed": adamw(forgetting_lr(baseline, steps))},
        functools.partial(embed_labels, embed_path=embed_path),
    )
  return optax.chain(optax.clip_by_global_norm(opt.clip), tx) if opt.clip else tx
