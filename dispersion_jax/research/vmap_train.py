"""Many small models in one compiled step: K sweep members trained at once by `jax.vmap` over their stacked train
states inside ONE jitted step (the sweep runner's `--vmap`).

Members may differ only in `seed` (init, step RNG, data order) and `dispersion.coeff` (a traced per-member scalar);
everything else (shapes, variant, loc, optimizer, schedule, steps...) is static and must match (`group_key`).

Data: each member reads exactly the batches its individual run (`train.run`) would read. `cfg.seed` also seeds the
block order, so there is one data stream per distinct seed, shared by the members with that seed.
Each member writes its own WORKDIR as `train.run` does (Orbax checkpoints with its data position and run config,
metrics.jsonl), so any member can be resumed, evaluated, or continued alone by `train.run`.

Benchmark (vmapped step vs the members' ordinary steps one by one, synthetic batches):
  python -m dispersion_jax bench --vmap_members 4,8 --config configs/gpt2_tiny.py [--config.KEY=VALUE ...]
"""

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.errors import CheckpointError, ConfigError, TrainingError
from dispersion_jax.models import build_model
from dispersion_jax.parallel import distributed, sharding
from dispersion_jax.training import lora_state, resume, train, validation
from dispersion_jax.training.checkpoint import Checkpointer
from dispersion_jax.training.loop import Hooks, run_loop
from dispersion_jax.training.metrics import MetricsLogger
from dispersion_jax.training.train_step import eval_params, init_state, state_shardings, trainable

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
  if with_dispersion:
    step, _ = train.step_function(cfg, model_cfg)
  else:
    plain, _ = train.step_function(cfg, model_cfg, disp=dataclasses.replace(disp, coeff=0.0))
    step = lambda state, batch, coeff: plain(state, batch)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def fn(states, batches_SxBxL, stream_K, coeffs_K):
    batch_KxBxL = jax.tree.map(lambda x: x[stream_K], batches_SxBxL)  # gathered on device: no host copies
    return jax.vmap(step)(states, batch_KxBxL, coeffs_K)

  return fn


def stack(trees: list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


# ------------------------------------------------------------------------------------------------ the loop
def run_group(cfgs: list[ConfigDict], workdirs: list[str], *, stop_at: int | None = None) -> int:
  """Trains every member to cfg.steps (or until SIGTERM / `stop_at`); returns the last completed step.

  All members must share `group_key` and their latest checkpoint step (none, or the same one). The loop is
  train.run's (loop.run_loop); only the step (vmapped over stacked states) and the save hook (one checkpoint per
  member, in its own workdir) differ.
  """
  with distributed.Preemption() as preempt:  # first, as in train.run
    return _run_group(cfgs, workdirs, preempt, stop_at)


def _run_group(cfgs: list[ConfigDict], workdirs: list[str], preempt, stop_at: int | None) -> int:
  if jax.process_count() > 1:
    raise TrainingError("vmapped sweeps run on one process; run the points individually instead")
  if len({group_key(c) for c in cfgs}) != 1 or len(cfgs) != len(workdirs):
    raise ConfigError("members of one vmapped group may differ only in " + ", ".join(MEMBER_KEYS))
  base, K = cfgs[0], len(cfgs)
  loop_cfg = config_lib.loop_config(base)
  model_cfg = config_lib.model_config(base)
  tx, _, _ = train.optimizer_and_step(base, model_cfg)
  train.check_vocab(base, model_cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  ds = train.open_data(base)
  seeds = sorted({c.seed for c in cfgs})
  stream_K = np.asarray([seeds.index(c.seed) for c in cfgs], np.int32)
  coeffs_K = np.asarray([c.dispersion.coeff for c in cfgs], np.float32)
  resumes = [resume.resume_point(c, w) for c, w in zip(cfgs, workdirs)]  # refuses a changed model, writes nothing
  starts = {step for step, _ in resumes}
  if len(starts) != 1:
    raise CheckpointError(f"members are at different checkpoint steps {sorted(starts, key=str)}; group them by step")
  for w in workdirs:
    os.makedirs(w, exist_ok=True)
  ckpts = [Checkpointer(w, loop_cfg.max_to_keep, timeout_s=loop_cfg.checkpoint_timeout_s) for w in workdirs]
  try:
    start = ckpts[0].latest_step()
    # One data stream per distinct seed, shared by the members with that seed (they saved the same position).
    first = {s: next(k for k, c in enumerate(cfgs) if c.seed == s) for s in seeds}
    data = {s: train.train_batches(cfgs[k], ds, mesh, resume.resume_row(ckpts[k], start, ds)) for s, k in first.items()}
    spec, adapters = lora_state.setup(base, model_cfg)  # LoRA: each member holds its base in state.frozen
    target, shardings = state_shardings(model_cfg, tx, mesh, spec)
    if start is None:
      params = train.pretrained_params(base, model_cfg)
      # traced seed: one compile for all members
      init = jax.jit(lambda s, p, a: init_state(model_cfg, tx, s, p, spec, a))
      states = [init(jnp.int32(c.seed), params, adapters) for c in cfgs]
    else:
      states = [train.restore_state(ck, start, c, model_cfg, spec, target, shardings) for ck, c in zip(ckpts, cfgs)]
    records = [None if spec is None else lora_state.record(spec, s.frozen) for s in states]
  except BaseException:
    for ck in ckpts:
      ck.close()
    raise
  states = stack(states)
  start = start or 0
  vstep = vmapped_step(base, with_dispersion=bool(np.any(coeffs_K != 0)))
  eval_fn = validation.jit_eval_step(
      build_model(model_cfg),
      config_lib.dispersion_config(base),
      mesh,
      eval_params(shardings),
      lora_scale=spec and spec.scale,
  )
  val_batches = validation.validation_batches(base, ds, mesh) if loop_cfg.eval_every else []
  loggers = [MetricsLogger(w, loop_cfg.steps, start, progress=k == 0) for k, w in enumerate(workdirs)]  # one bar
  loggers[0].write(
      f"{'resuming from step ' + str(start) if start else 'starting'}: {K} members in one vmapped "
      f"step ({len(seeds)} data streams), {model_cfg.n_layer} layers, width {model_cfg.n_embd}"
  )
  for lg, (_, changed) in zip(loggers, resumes):
    lg.record_resume(start, changed)
    resume.announce_changes(lg, start, changed)

  def log(step, m, tokens_per_s):  # tokens/s per member
    for k, lg in enumerate(loggers):
      row = {
          key: v[k] for key, v in m.items() if coeffs_K[k] != 0 or not key.startswith("dispersion/")
      }  # as its individual run logs
      lg.log(step, {**row, "tokens_per_s": tokens_per_s})

  def save(step, states):
    for k, ck in enumerate(ckpts):
      d = data[cfgs[k].seed]
      ck.save(step, trainable(member(states, k)), d.state(d.rows_consumed(step - start)), cfgs[k].to_dict(), records[k])

  def evaluate(step, states):  # one member at a time: the single-model eval, the numbers train.run logs
    for k, lg in enumerate(loggers):
      if lg.has(step, "eval"):
        continue
      row = validation.validation_metrics(eval_fn, eval_params(member(states, k)), val_batches)
      row.pop("tokens")
      lg.log(step, row, kind="eval")

  def batches():  # [S, B, L]: one row block per data stream, gathered per member on the device
    streams = [data[s].local_iter(0, loop_cfg.steps - start) for s in seeds]
    for rows in zip(*streams):
      yield {key: np.stack([b[key] for b in rows]) for key in rows[0]}

  hooks = Hooks(
      log=log,
      save=save,
      evaluate=evaluate,
      last_checkpoint=ckpts[0].latest_step,
      advance=lambda: [lg.advance() for lg in loggers],
      should_stop=lambda step: preempt.requested or step == stop_at,
      name_member=lambda k: f" in {workdirs[k]}",
  )
  try:
    if start and loop_cfg.evaluates_at(start) and not all(lg.has(start, "eval") for lg in loggers):
      evaluate(start, states)  # as train.run: killed between the checkpoint and its evaluation
    out = run_loop(
        lambda st, b: vstep(st, b, stream_K, coeffs_K),
        states,
        batches(),
        start=start,
        cfg=loop_cfg,
        hooks=hooks,
        tokens_per_step=base.batch_size * base.seq_len,
    )
    if out.preempted:
      loggers[0].write(f"preempted at step {out.step}: checkpoints saved; re-run the same command to resume")
  finally:
    for ck in ckpts:
      ck.close()
    for lg in loggers:
      lg.close()
  return out.step


# ------------------------------------------------------------------------------------------------ benchmark
def benchmark(cfg: ConfigDict, members: list[int], steps: int = 5, repeats: int = 3) -> list[dict]:
  """Seconds per optimizer step of all K members, three ways:
    separate   K x the step time of one model alone: what K individual runs (sweep without --vmap) cost
    interleaved  K ordinary jitted steps dispatched in turn in one process (async dispatch overlaps them)
    vmap       one vmapped step of the K stacked members
  Synthetic token batches (the data pipeline is not timed); compile excluded. They are timed in alternating
  windows of `steps` steps and the fastest window of each is kept (robust to other jobs on a shared machine).
  """
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  step_fn, tx = train.step_function(cfg, model_cfg)
  ids_BxL = jax.random.randint(jax.random.PRNGKey(0), (cfg.batch_size, cfg.seq_len), 0, model_cfg.vocab_size)
  batch = {"input_ids": ids_BxL, "targets": jnp.roll(ids_BxL, -1, 1)}
  single = jax.jit(step_fn, donate_argnums=(0,))
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
    rows.append(
        {
            "members": K,
            "separate_s": K * single_s,
            "interleaved_s": seq,
            "vmap_s": vm,
            "speedup_vs_separate": K * single_s / vm,
            "speedup_vs_interleaved": seq / vm,
            "vmap_tok_s": tokens / vm,
        }
    )
  return [r for r in rows if r["members"] in members]


def table(rows: list[dict]) -> str:
  lines = [
      "| K | separate runs (K x one model, s/step) | interleaved in one process (s/step) | vmap (s/step) | "
      "vmap speed-up vs separate | vs interleaved | vmap tokens/s (all members) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['members']} | {r['separate_s']:.3f} | {r['interleaved_s']:.3f} | {r['vmap_s']:.3f} | "
        f"{r['speedup_vs_separate']:.2f}x | {r['speedup_vs_interleaved']:.2f}x | {r['vmap_tok_s']:,.0f} |"
    )
  return "\n".join(lines)
