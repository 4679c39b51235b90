"""Many small models in one compiled step: K sweep members trained at once by `jax.vmap` over their stacked train
states inside ONE jitted step (the sweep runner's `--vmap`).

Members may differ only in `seed` (init, step RNG, data order) and `dispersion.coeff` (a traced per-member scalar);
everything else (shapes, variant, loc, optimizer, schedule, steps...) is static and must match (`group_key`).

Data: each member reads exactly the batches its individual run (`train.run`) would read. `cfg.seed` also seeds the
pipeline's document shuffle, so there is one iterator per distinct seed, shared by the members with that seed.
Each member writes its own WORKDIR as `train.run` does (Orbax checkpoints with its data-iterator state,
config.json, metrics.jsonl), so any member can be resumed, evaluated, or continued alone by `train.run`.

Benchmark (vmapped step vs the members' ordinary steps one by one, synthetic batches):
  python -m dispersion_jax.vmap_train --config configs/gpt2_tiny.py --members 4,8 [--steps 5] [--config.KEY=VALUE ...]
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import sharding, train
from dispersion_jax.checkpoint import Checkpointer
from dispersion_jax.metrics import MetricsLogger
from dispersion_jax.models import GPT
from dispersion_jax.train_step import (eval_step, init_state,
                                       lr_schedule, make_optimizer, train_step)

MEMBER_KEYS = ("seed", "dispersion.coeff")  # what may differ inside one compiled group


def group_key(cfg: ConfigDict) -> str:
  """Everything but the member keys: configs with equal keys can share one vmapped step."""
  d = json.loads(cfg.to_json())
  d.pop("seed")
  d["dispersion"].pop("coeff")
  return json.dumps(d, sort_keys=True)


# ------------------------------------------------------------------------------------------------ the step
def vmapped_step(cfg: ConfigDict, with_dispersion: bool):
  """jit(vmap(step)): (states [K...], batches [S, b, L], member -> data-stream index [K], coeffs [K])."""
  model_cfg = config_lib.model_config(cfg)
  disp = config_lib.dispersion_config(cfg)
  # All members at coeff 0: the plain objective, exactly as the individual runs compute it (no dispersion term).
  step = functools.partial(train_step if with_dispersion else _step_without_dispersion, model=GPT(model_cfg),
                           disp=disp if with_dispersion else dataclasses.replace(disp, coeff=0.0),
                           tx=make_optimizer(cfg), schedule=lr_schedule(cfg), grad_accum=cfg.grad_accum)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def fn(states, batches_SxBxL, stream_K, coeffs_K):
    batch_KxBxL = jax.tree.map(lambda x: x[stream_K], batches_SxBxL)  # gathered on device: no host copies
    return jax.vmap(step)(states, batch_KxBxL, coeffs_K)
  return fn


def _step_without_dispersion(state, batch, coeff, **kw):
  del coeff
  return train_step(state, batch, **kw)


def stack(trees: list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


# ------------------------------------------------------------------------------------------------ the loop
def run_group(cfgs: list[ConfigDict], workdirs: list[str], *, stop_at: int | None = None) -> int:
  """Trains every member to cfg.steps (or until SIGTERM / `stop_at`); returns the last completed step.

  All members must share `group_key` and their latest checkpoint step (none, or the same one).
  """
  if jax.process_count() > 1:
    raise train.TrainingError("vmapped sweeps run on one process; run the points individually instead")
  if len({group_key(c) for c in cfgs}) != 1 or len(cfgs) != len(workdirs):
    raise ValueError("members of one vmapped group may differ only in " + ", ".join(MEMBER_KEYS))
  base, K = cfgs[0], len(cfgs)
  model_cfg, tx = config_lib.model_config(base), make_optimizer(base)
  vocab = train._tokenizer_vocab(base)
  if vocab > model_cfg.vocab_size:
    raise train.TrainingError(f"tokenizer {base.tokenizer!r} has {vocab} tokens but the model only "
                              f"{model_cfg.vocab_size}; set model.vocab_size")
  dev = jax.devices()[0]
  mesh = Mesh(np.asarray([dev]).reshape(1, 1, 1), sharding.AXES, axis_types=(AxisType.Auto,) * 3)  # data, eval
  seeds = sorted({c.seed for c in cfgs})
  iters = {s: train._data(next(c for c in cfgs if c.seed == s), "train", base.batch_size, mesh) for s in seeds}
  stream_K = np.asarray([seeds.index(c.seed) for c in cfgs], np.int32)
  coeffs_K = np.asarray([c.dispersion.coeff for c in cfgs], np.float32)
  ckpts = [Checkpointer(w, base.max_to_keep) for w in workdirs]
  starts = {ck.latest_step() for ck in ckpts}
  if len(starts) != 1:
    raise ValueError(f"members are at different checkpoint steps {sorted(starts, key=str)}; group them by step")
  start = starts.pop()
  if start is None:
    params = None
    if base.init_from:
      from dispersion_jax.hf import load_gpt2
      _, params = load_gpt2(base.init_from, param_dtype=model_cfg.param_dtype)
    init = jax.jit(lambda s, p: init_state(model_cfg, tx, s, p))  # traced seed: one compile for all members
    states = [init(jnp.int32(c.seed), params) for c in cfgs]
  else:
    one = jax.sharding.SingleDeviceSharding(dev)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                          jax.eval_shape(lambda: init_state(model_cfg, tx, 0)))
    restored = set()  # each shared iterator is restored once (every member with that seed saved the same state)
    states = []
    for c, ck in zip(cfgs, ckpts):
      it = None if c.seed in restored else iters[c.seed]
      restored.add(c.seed)
      states.append(ck.restore(start, target, it))
  states = stack(states)
  start = start or 0
  for c, w in zip(cfgs, workdirs):
    with open(os.path.join(w, "config.json"), "w") as fh:
      json.dump(c.to_dict(), fh, indent=2)
  step_fn = vmapped_step(base, with_dispersion=bool(np.any(coeffs_K != 0)))
  eval_fn = jax.jit(functools.partial(eval_step, model=GPT(model_cfg), disp=config_lib.dispersion_config(base)))
  loggers = [MetricsLogger(w, base.steps, start, progress=k == 0) for k, w in enumerate(workdirs)]  # one bar
  loggers[0].write(f"{'resuming from step ' + str(start) if start else 'starting'}: {K} members in one vmapped "
                   f"step ({len(seeds)} data streams), {model_cfg.n_layer} layers, width {model_cfg.n_embd}")
  preempt = train._Preemption()
  tokens_per_step = base.batch_size * base.seq_len  # per member
  window = (start, time.perf_counter())
  pending = None

  def finish(step_and_metrics, force_log=False):
    nonlocal window
    s, m = step_and_metrics
    loss_K = np.asarray(jax.device_get(m["loss"]))
    bad = np.flatnonzero(~np.isfinite(loss_K))
    if bad.size:  # the whole group stops: every member resumes from its last good checkpoint
      k = bad[0]
      raise train.TrainingError(f"non-finite loss ({loss_K[k]}) at step {s} in {workdirs[k]}; the last good "
                                f"checkpoint is step {ckpts[k].latest_step()}; lower optimizer.lr or "
                                "dispersion.coeff, then re-run to resume")
    if s % base.log_every == 0 or force_log:
      now = time.perf_counter()
      tps = (s - window[0]) * tokens_per_step / max(now - window[1], 1e-9)  # per member
      window = (s, now)
      m = jax.device_get(m)
      for k, lg in enumerate(loggers):
        row = {key: v[k] for key, v in m.items()
               if coeffs_K[k] != 0 or not key.startswith("dispersion/")}  # as its individual run logs
        lg.log(s, {**row, "tokens_per_s": tps})

  step = start
  try:
    while step < base.steps:
      if preempt.requested or step == stop_at:
        break
      batches = [next(iters[s]) for s in seeds]
      batch_SxBxL = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
      states, metrics = step_fn(states, batch_SxBxL, stream_K, coeffs_K)
      step += 1
      if pending is not None:
        finish(pending)
      pending = (step, metrics)
      for lg in loggers:
        lg.advance()
      if step % base.checkpoint_every == 0 or step == base.steps:
        finish(pending, force_log=step == base.steps)
        pending = None
        _save(ckpts, step, states, [iters[c.seed] for c in cfgs], cfgs)
      if base.eval_every and (step % base.eval_every == 0 or step == base.steps):
        for k, lg in enumerate(loggers):  # one member at a time: the single-model eval, same numbers as train.run
          lg.log(step, train.evaluate(cfgs[k], eval_fn, member(states.params, k), mesh))
    if pending is not None:
      finish(pending)
    if step < base.steps:  # preempted: save where we are, then exit cleanly
      if any(ck.latest_step() != step for ck in ckpts):
        _save(ckpts, step, states, [iters[c.seed] for c in cfgs], cfgs)
      loggers[0].write(f"preempted at step {step}: checkpoints saved; re-run the same command to resume")
  finally:
    for ck in ckpts:
      ck.close()
    for lg in loggers:
      lg.close()
  return step


def _save(ckpts: list[Checkpointer], step: int, states, data_iters: list, cfgs: list[ConfigDict]) -> None:
  for k, ck in enumerate(ckpts):
    ck.save(step, member(states, k), data_iters[k], cfgs[k])


# ------------------------------------------------------------------------------------------------ benchmark
def benchmark(cfg: ConfigDict, members: list[int], steps: int = 5, repeats: int = 3) -> list[dict]:
  """Seconds per optimizer step of all K members, three ways:
    separate   K x the step time of one model alone: what K individual runs (sweep without --vmap) cost
    interleaved  K ordinary jitted steps dispatched in turn in one process (async dispatch overlaps them)
    vmap       one vmapped step of the K stacked members
  Synthetic token batches (the data pipeline is not timed); compile excluded. They are timed in alternating
  windows of `steps` steps and the fastest window of each is kept (robust to other jobs on a shared machine).
  """
  model_cfg, tx = config_lib.model_config(cfg), make_optimizer(cfg)
  model, disp, schedule = GPT(model_cfg), config_lib.dispersion_config(cfg), lr_schedule(cfg)
  ids_BxL = jax.random.randint(jax.random.PRNGKey(0), (cfg.batch_size, cfg.seq_len), 0, model_cfg.vocab_size)
  batch = {"input_ids": ids_BxL, "targets": jnp.roll(ids_BxL, -1, 1)}
  single = jax.jit(functools.partial(train_step, model=model, disp=disp, tx=tx, schedule=schedule,
                                     grad_accum=cfg.grad_accum), donate_argnums=(0,))
  init = jax.jit(lambda s: init_state(model_cfg, tx, s))
  rows, single_s = [], None
  for K in sorted(set(members) | {1}):
    states = [init(jnp.int32(k)) for k in range(K)]
    vstep = vmapped_step(cfg, with_dispersion=disp.coeff != 0)
    batch_1xBxL = jax.tree.map(lambda x: x[None], batch)
    stream_K, coeffs_K = jnp.zeros((K,), jnp.int32), jnp.full((K,), disp.coeff, jnp.float32)
    stacked = stack(states)

    def one_by_one():
      for _ in range(steps):
        for k in range(K):
          states[k], m = single(states[k], batch)
      jax.block_until_ready(m)

    def vmapped():
      nonlocal stacked
      for _ in range(steps):
        stacked, m = vstep(stacked, batch_1xBxL, stream_K, coeffs_K)
      jax.block_until_ready(m)

    best = {one_by_one: math.inf, vmapped: math.inf}
    for r in range(repeats + 1):  # window 0 compiles and warms up
      for fn in best:
        t0 = time.perf_counter()
        fn()
        if r:
          best[fn] = min(best[fn], (time.perf_counter() - t0) / steps)
    seq, vm = best[one_by_one], best[vmapped]
    single_s = single_s or seq  # K = 1 comes first
    tokens = K * cfg.batch_size * cfg.seq_len
    rows.append({"members": K, "separate_s": K * single_s, "interleaved_s": seq, "vmap_s": vm,
                 "speedup_vs_separate": K * single_s / vm, "speedup_vs_interleaved": seq / vm,
                 "vmap_tok_s": tokens / vm})
  return [r for r in rows if r["members"] in members]


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m dispersion_jax.vmap_train", description="vmap vs one-by-one benchmark")
  p.add_argument("--members", default="4,8", help="comma-separated K values")
  p.add_argument("--steps", type=int, default=5, help="steps per timed window")
  p.add_argument("--repeats", type=int, default=3, help="timed windows (best is kept)")
  args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg, _ = config_lib.parse_args(rest + ["--workdir", "unused"])
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  rows = benchmark(cfg, [int(k) for k in args.members.split(",")], args.steps, args.repeats)
  print(f"device: {jax.devices()[0].device_kind}; model {cfg.model.n_layer}x{cfg.model.n_embd}, batch "
        f"{cfg.batch_size}x{cfg.seq_len}, dispersion {cfg.dispersion.variant} coeff {cfg.dispersion.coeff}")
  print("| K | separate runs (K x one model, s/step) | interleaved in one process (s/step) | vmap (s/step) | "
        "vmap speed-up vs separate | vs interleaved | vmap tokens/s (all members) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['members']} | {r['separate_s']:.3f} | {r['interleaved_s']:.3f} | {r['vmap_s']:.3f} | "
          f"{r['speedup_vs_separate']:.2f}x | {r['speedup_vs_interleaved']:.2f}x | {r['vmap_tok_s']:,.0f} |")


if __name__ == "__main__":
  main()
