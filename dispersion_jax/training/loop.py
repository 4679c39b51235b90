"""The one training loop, for single and vmapped runs: step, fetch metrics one step late, stop on a non-finite
loss, checkpoint, evaluate, stop cleanly on preemption. What differs between runs comes in as the step function
and the hooks (a vmapped run steps stacked states and saves each member into its own workdir).
"""

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from dispersion_jax.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 1000  # optimizer steps of the whole run (a resumed run continues to it)
  log_every: int = 10
  eval_every: int | None = 200  # None (or 0) = never
  eval_batches: int = 8
  checkpoint_every: int = 200
  max_to_keep: int | None = 3  # checkpoints kept; None = all
  # A checkpoint save (its blocking part, or the wait for the previous async save to commit) or a restore that the
  # storage does not complete within this many seconds ends the run with one line (exit 75); the last complete
  # checkpoint stays the resume point. Orbax's own async bound is 1200 s; MaxText users expect minutes.
  checkpoint_timeout_s: float = 600.0

  def evaluates_at(self, step: int) -> bool:
    """Whether the loop evaluates after `step`: every eval_every steps and at the last one."""
    return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.steps)

  def __post_init__(self):
    for key in ("steps", "log_every", "checkpoint_every", "eval_batches"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
    if not self.checkpoint_timeout_s > 0:
      raise ValueError(f"checkpoint_timeout_s={self.checkpoint_timeout_s} must be > 0 (seconds)")


@dataclasses.dataclass
class Hooks:
  """What the loop calls; every hook runs on every process (only the lead one writes)."""

  log: Callable[[int, dict, float], None]  # (step, host metrics, tokens/s), every log_every steps
  save: Callable[[int, Any], None]  # (step, state): a checkpoint
  last_checkpoint: Callable[[], int | None]  # the newest finished checkpoint step, None if none
  evaluate: Callable[[int, Any], None] | None = None  # (step, state), every eval_every steps and at the end
  should_stop: Callable[[int], bool] = lambda step: False  # preemption: checked before each step
  advance: Callable[[], None] = lambda: None  # the progress bar
  name_member: Callable[[int], str] = lambda k: ""  # vmapped runs: " in WORKDIR" of the k-th member


@dataclasses.dataclass
class Outcome:
  step: int  # the last completed step
  state: Any
  preempted: bool
  last_metrics: dict | None  # host metrics of the last logged step


def run_loop(
    step_fn: Callable, state: Any, batches: Iterator, *, start: int, cfg: LoopConfig, hooks: Hooks, tokens_per_step: int
) -> Outcome:
  """Runs steps start+1..cfg.steps. `batches` is pulled once per step, right before it (so an iterator's state
  at a checkpoint is exactly the data consumed so far). Metrics arrive one step late: the host never waits for
  the device except at checkpoints (a non-finite state is never saved) and at the end."""
  window = (start, time.perf_counter())
  pending = None  # (step, device metrics) of the previous step
  last = None

  def finish(step_and_metrics, force_log=False):
    nonlocal window, last
    s, m = step_and_metrics
    loss = np.atleast_1d(np.asarray(jax.device_get(m["loss"])))  # [K] for K vmapped members
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
      good = hooks.last_checkpoint()
      resume = (
          "the last good checkpoint is step {}; ".format(good)
          if good is not None
          else "no checkpoint was saved yet, so a re-run starts from scratch; "
      )
      raise TrainingError(
          f"non-finite loss ({loss[bad[0]]}) at step {s}{hooks.name_member(int(bad[0]))}; {resume}"
          "lower optimizer.lr (or dispersion.coeff) or check the data, then re-run"
      )
    if s % cfg.log_every == 0 or force_log:
      now = time.perf_counter()
      tps = (s - window[0]) * tokens_per_step / max(now - window[1], 1e-9)
      window = (s, now)
      last = jax.device_get(m)
      hooks.log(s, last, tps)

  step = start
  while step < cfg.steps:
    if hooks.should_stop(step):
      break
    state, metrics = step_fn(state, next(batches))
    step += 1
    if pending is not None:
      finish(pending)
    pending = (step, metrics)
    hooks.advance()
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
      finish(pending, force_log=step == cfg.steps)
      pending = None
      hooks.save(step, state)
    if hooks.evaluate is not None and cfg.evaluates_at(step):
      hooks.evaluate(step, state)
  if pending is not None:
    finish(pending)
  preempted = step < cfg.steps
  if preempted and hooks.last_checkpoint() != step:  # save where we are, then exit cleanly
    hooks.save(step, state)
  return Outcome(step=step, state=state, preempted=preempted, last_metrics=last)
