"""python -m dispersion_jax.train --config configs/gpt2_tiny.py --workdir runs/demo [--config.KEY=VALUE ...]

Pre-trains (or mid-trains, with init_from) a GPT with CE + coeff * dispersion. Re-running the same command with
the same workdir resumes exactly from the latest checkpoint (train state + data iterator state).
"""
import functools
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import distributed, sharding
from dispersion_jax.checkpoint import Checkpointer, CheckpointError
from dispersion_jax.condensation import spearman
from dispersion_jax.metrics import MetricsLogger
from dispersion_jax.models import GPT
from dispersion_jax.train_step import (eval_step, init_state, jit_train_step, logical_context, lr_schedule,
                                       make_optimizer, state_shardings, train_step)


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, missing data); one line that names the fix."""


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:      # multi-process: jax's preemption service owns SIGTERM (distributed.py)
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True


def _data(cfg: ConfigDict, split: str, batch_size: int, mesh, prepare: bool = True, **kw):
  from dispersion_jax.data import pipeline
  try:
    if prepare:  # once per run; evaluation reads what the training iterator already prepared
      if jax.process_index() == 0:
        pipeline.build_dataset(cfg)  # cached under the TFDS data dir; later runs only read it
      distributed.barrier("dataset_built")
    # Each process reads only the document shards of its rows of the global batch.
    return distributed.process_iterator(cfg, split, sharding.batch_sharding(mesh), batch_size, **kw)
  except (ValueError, FileNotFoundError) as e:
    raise TrainingError(f"data: {e}") from e


def _tokenizer_vocab(cfg: ConfigDict) -> int:
  from dispersion_jax.tokenizer import get_tokenizer
  try:
    return get_tokenizer(cfg.tokenizer).vocab_size
  except ValueError as e:
    raise TrainingError(f"tokenizer: {e}") from e


def _global(batch: dict, mesh) -> dict:
  """Per-process numpy batches -> one global array per key, sharded on (data, fsdp)."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, np.asarray(v)) for k, v in batch.items()}


def initial_state(cfg: ConfigDict, model_cfg, tx, shard):
  params = None
  if cfg.init_from:
    from dispersion_jax.hf import load_gpt2
    _, params = load_gpt2(cfg.init_from, param_dtype=model_cfg.param_dtype)
    params = jax.device_put(params, shard.params)
  return jax.jit(lambda p: init_state(model_cfg, tx, cfg.seed, p), out_shardings=shard)(params)


def evaluate(cfg: ConfigDict, eval_fn, params, mesh) -> dict[str, float]:
  """Validation loss / perplexity / dispersion / condensation on the same fixed batches every time."""
  it = _data(cfg, "validation", cfg.batch_size // cfg.grad_accum, mesh, prepare=False, shuffle=False,
             num_epochs=None)
  totals = None
  for _ in range(cfg.eval_batches):
    out = eval_fn(params, _global(next(it), mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  n = float(totals.pop("batches"))
  val_loss = float(totals.pop("ce_sum")) / max(float(totals.pop("tokens")), 1.0)
  result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0)),
            "val_dispersion": float(totals.pop("dispersion_sum")) / n}
  means = {k: float(v) / n for k, v in totals.items() if k.startswith("condensation/mean_cos/")}
  result.update(means)
  result["condensation/spearman"] = spearman([means[k] for k in sorted(means, key=lambda s: int(s.rsplit("_", 1)[1]))])
  return result


def run(cfg: ConfigDict, workdir: str, *, devices: list | None = None, stop_at: int | None = None) -> int:
  """Trains to cfg.steps (or until SIGTERM / `stop_at`, handled alike); returns the last completed step."""
  preempt = _Preemption()             # first: a SIGTERM during set-up still ends in a clean save and exit
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg, devices)
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  model, tx, schedule = GPT(model_cfg), make_optimizer(cfg), lr_schedule(cfg)
  train_it = _data(cfg, "train", cfg.batch_size, mesh)
  vocab = _tokenizer_vocab(cfg)
  if vocab > model_cfg.vocab_size:
    raise TrainingError(f"tokenizer {cfg.tokenizer!r} has {vocab} tokens but the model only {model_cfg.vocab_size}; "
                        "set model.vocab_size (or use a matching tokenizer / init_from)")

  abstract, shard = state_shardings(model_cfg, tx, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
  ckpt = Checkpointer(workdir, cfg.max_to_keep)
  start = ckpt.latest_step()
  with logical_context(mesh):
    state = initial_state(cfg, model_cfg, tx, shard) if start is None else ckpt.restore(start, target, train_it)
    step_fn = jit_train_step(functools.partial(train_step, model=model, disp=disp, tx=tx, schedule=schedule,
                                               grad_accum=cfg.grad_accum), mesh, shard)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, disp=disp),
                      in_shardings=(shard.params, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
  start = start or 0
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      json.dump(cfg.to_dict(), fh, indent=2)
  logger = MetricsLogger(workdir, cfg.steps, start, enabled=lead)
  logger.write(f"{'resuming from step ' + str(start) if start else 'starting'}: {model_cfg.n_layer} layers, "
               f"width {model_cfg.n_embd}, mesh {dict(mesh.shape)}, {cfg.batch_size}x{cfg.seq_len} tokens/step")
  tokens_per_step = cfg.batch_size * cfg.seq_len
  pending = None                      # (step, device metrics) of the previous step: fetched one step late
  window = (start, time.perf_counter())

  def finish(step_and_metrics, force_log=False):
    nonlocal window
    s, m = step_and_metrics
    loss = float(m["loss"])           # a scalar, one step behind the device: no stall
    if not math.isfinite(loss):
      raise TrainingError(f"non-finite loss ({loss}) at step {s}; the last good checkpoint is step "
                          f"{ckpt.latest_step()}; lower optimizer.lr or check the data, then re-run to resume")
    if s % cfg.log_every == 0 or force_log:
      now = time.perf_counter()
      tps = (s - window[0]) * tokens_per_step / max(now - window[1], 1e-9)
      window = (s, now)
      logger.log(s, {**jax.device_get(m), "tokens_per_s": tps})

  step = start
  try:
    with logical_context(mesh):
      while step < cfg.steps:
        if distributed.preemption_requested(preempt.requested or step == stop_at, ckpt, step):
          break
        state, metrics = step_fn(state, _global(next(train_it), mesh))
        step += 1
        if pending is not None:
          finish(pending)
        pending = (step, metrics)
        logger.advance()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          finish(pending, force_log=step == cfg.steps)  # never checkpoint a non-finite state
          pending = None
          ckpt.save(step, state, train_it, cfg)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
          logger.log(step, evaluate(cfg, eval_fn, state.params, mesh))
      if pending is not None:
        finish(pending)
      if step < cfg.steps:            # preempted: save where we are, then exit cleanly
        if ckpt.latest_step() != step:
          ckpt.save(step, state, train_it, cfg)
        logger.write(f"preempted at step {step}: checkpoint saved; re-run the same command to resume")
  finally:
    ckpt.close()
    logger.close()
  return step


def main(argv: list[str] | None = None) -> None:
  try:
    argv, launch = distributed.pop_cli_flags(sys.argv[1:] if argv is None else argv)
    cfg, workdir = config_lib.parse_args(argv)
    distributed.initialize(launch)  # before anything touches the backend
    config_lib.validate(cfg, jax.device_count())
    distributed.check_same_config(cfg)
    if cfg.dry_run:
      from dispersion_jax.dry_run import dry_run
      dry_run(cfg)
      return
    run(cfg, workdir)
  except (config_lib.ConfigError, CheckpointError, TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    distributed.exit_now(2)  # multi-process: no shutdown barrier with peers that may still be computing


if __name__ == "__main__":
  main()
