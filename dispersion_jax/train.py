"""A training run from a validated run config: mesh, model, data, state, checkpoints, then the loop (loop.py).

Pre-trains (or mid-trains, with init_from) a model with CE + coeff * dispersion. Running it again with the same
workdir resumes exactly from the latest checkpoint (train state + data position), on any process count or mesh. The command line is
`python -m dispersion_jax.train` (cli/train.py).
"""

import functools
import math
import os
import shlex
import sys

import jax
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import distributed, harness_tasks, sharding
from dispersion_jax.checkpoint import Checkpointer
from dispersion_jax.condensation import spearman
from dispersion_jax.data import build, loader
from dispersion_jax.data.packed import PackedDataset
from dispersion_jax import lora, lora_run, models
from dispersion_jax.baselines import Forgetting
from dispersion_jax.errors import CheckpointError, ConfigError, DataError
from dispersion_jax.loop import Hooks, run_loop
from dispersion_jax.metrics import MetricsLogger
from dispersion_jax.models import build_model, flops_per_token
from dispersion_jax.optim import lr_schedule, make_optimizer
from dispersion_jax.tokenizer import get_tokenizer
from dispersion_jax.train_step import (
    base_params,
    eval_params,
    eval_step,
    init_state,
    jit_train_step,
    logical_context,
    state_shardings,
    train_step,
    trainable,
)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5": 197e12, "TPU v4": 275e12}  # dense bf16


def open_data(cfg: ConfigDict) -> PackedDataset:
  """The run's pre-packed dataset. The embedded corpus is built on first use (by process 0; the others wait and
  open it); any other source must have been built (`python -m dispersion_jax.data.build`, a DataError says so)."""
  data_cfg, lead = config_lib.data_config(cfg), jax.process_index() == 0

  def open_():
    return build.open_or_build_default(data_cfg, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, progress=lead)

  ds = open_() if lead else None
  distributed.barrier("dataset_built")
  return ds if lead else open_()


def resume_row(ckpt: Checkpointer, step: int | None, ds: PackedDataset) -> int:
  """Where in the data stream a run resumes: the checkpoint's rows consumed (checked against the dataset), or,
  for a checkpoint of an earlier version (Grain iterator state), step x its global batch."""
  if step is None:
    return 0
  state = ckpt.data_state(step)
  if state is None:
    return loader.legacy_rows_consumed(step, config_lib.from_saved(ckpt.saved_config(step)).batch_size)
  return loader.check_resume(state, ds)


def train_batches(cfg: ConfigDict, ds: PackedDataset, mesh, start_row: int) -> loader.TrainBatches:
  return loader.TrainBatches(
      ds,
      global_batch=cfg.batch_size,
      seed=cfg.seed,
      sharding=sharding.batch_sharding(mesh),
      start_row=start_row,
      read_threads=config_lib.data_config(cfg).read_threads,
  )


def optimizer_and_step(cfg: ConfigDict, model_cfg):
  """(optimizer, learning-rate schedule, the baseline's train_step keywords) of a run: one place, for training,
  restoring, vmapped sweeps and the dry run alike."""
  opt, steps, base = (
      config_lib.optimizer_config(cfg),
      config_lib.loop_config(cfg).steps,
      config_lib.baseline_config(cfg),
  )
  family = models.family(model_cfg)
  tx = make_optimizer(opt, steps, base, family.EMBED_PATH)
  kw = {}
  if base.method == "neftune":
    kw["embed_noise_alpha"] = family.NEFTUNE_ALPHA if base.neftune_alpha is None else base.neftune_alpha
  elif base.method == "active_forgetting":
    pad = base.pad_id
    if pad is None:
      try:
        pad = get_tokenizer(cfg.tokenizer).eos_id  # the authors' pad id: GPT-2 pad := eos, Qwen3 <|endoftext|>
      except ValueError as e:
        raise DataError(f"tokenizer: {e}") from e
    if not 0 <= pad < model_cfg.vocab_size:
      raise ConfigError(
          f"baseline.pad_id={pad} is outside the vocabulary [0, {model_cfg.vocab_size}); set baseline.pad_id"
      )
    kw["forgetting"] = Forgetting(base.forget_every, base.forget_std, pad, tuple(family.EMBED_PATH))
  return tx, lr_schedule(opt, steps), kw


def step_function(cfg: ConfigDict, model_cfg, disp=None):
  """(the run's train step with every setting bound, not jitted; its optimizer): the one construction that
  training, the dry run, bench and vmapped sweeps share. `disp` replaces the run's DispersionConfig."""
  tx, schedule, baseline_kw = optimizer_and_step(cfg, model_cfg)
  spec, _ = lora_run.setup(cfg, model_cfg)
  fn = functools.partial(
      train_step,
      model=build_model(model_cfg),
      disp=config_lib.dispersion_config(cfg) if disp is None else disp,
      tx=tx,
      schedule=schedule,
      grad_accum=cfg.grad_accum,
      ce_chunk=cfg.ce_chunk,
      lora_scale=None if spec is None else spec.scale,
      **baseline_kw,
  )
  return fn, tx


def frozen_base(cfg: ConfigDict, model_cfg, shardings):
  """A LoRA run's base weights, placed: init_from's, or the fresh initialisation of cfg.seed."""
  params = pretrained_params(cfg, model_cfg)
  if params is None:
    return jax.jit(lambda: base_params(model_cfg, cfg.seed), out_shardings=shardings)()
  return jax.device_put(params, shardings)


def restore_state(ckpt: Checkpointer, step: int, cfg: ConfigDict, model_cfg, spec, target, shardings):
  """The train state of checkpoint `step`; for LoRA with the base weights re-read and checked against the
  checkpoint's fingerprint (another base is a one-line CheckpointError)."""
  record = lora_run.check_setting(ckpt, step, spec)
  state = ckpt.restore(step, trainable(target))
  if spec is None:
    return state
  base = frozen_base(cfg, model_cfg, shardings.frozen)
  lora_run.check_base(record, base, f"checkpoint {ckpt.directory}/{step}")
  return state.replace(frozen=base)


def check_vocab(cfg: ConfigDict, model_cfg) -> None:
  try:
    vocab = get_tokenizer(cfg.tokenizer).vocab_size
  except ValueError as e:
    raise DataError(f"tokenizer: {e}") from e
  if vocab > model_cfg.vocab_size:
    raise DataError(
        f"tokenizer {cfg.tokenizer!r} has {vocab} tokens but the model only {model_cfg.vocab_size}; "
        "set model.vocab_size (or use a matching tokenizer / init_from)"
    )


def pretrained_params(cfg: ConfigDict, model_cfg):
  """The init_from checkpoint's parameters, or None for a fresh initialisation."""
  if not cfg.init_from:
    return None
  from dispersion_jax import hf  # noqa: PLC0415 - safetensors only when mid-training

  try:
    return hf.load_pretrained(cfg.init_from, param_dtype=model_cfg.param_dtype)[1]
  except (ValueError, OSError) as e:
    raise DataError(f"init_from={cfg.init_from}: {e}") from None


def validation_batches(cfg: ConfigDict, ds: PackedDataset, mesh) -> list[dict]:
  """The run's fixed validation batches (the same ones at every evaluation and on every topology)."""
  val = loader.ValidationBatches(
      ds, global_batch=cfg.batch_size // cfg.grad_accum, sharding=sharding.batch_sharding(mesh), read_threads=0
  )
  return list(val.iter_from(0, cfg.eval_batches))


def validation_metrics(eval_fn, params, batches) -> dict[str, float]:
  """Validation loss / perplexity / dispersion / condensation: the one definition, for training and `evaluate`."""
  totals = None
  for batch in batches:
    out = eval_fn(params, batch)
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  tokens = float(totals.pop("tokens"))
  val_loss = float(totals.pop("ce_sum")) / max(tokens, 1.0)
  result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0)), "tokens": tokens}
  if "dispersion_sum" not in totals:  # an eval step without the dispersion / condensation part
    return result
  n = float(totals.pop("batches"))
  result["val_dispersion"] = float(totals.pop("dispersion_sum")) / n
  means = {k: float(v) / n for k, v in totals.items() if k.startswith("condensation/mean_cos/")}
  result.update(means)
  result["condensation/spearman"] = spearman([means[k] for k in sorted(means, key=lambda s: int(s.rsplit("_", 1)[1]))])
  return result


def jit_eval_step(model, disp, mesh, param_shardings, with_dispersion: bool = True, lora_scale: float | None = None):
  """`param_shardings`: eval_params(shardings) of the run's state (a pair for LoRA, with lora_scale)."""
  return jax.jit(
      functools.partial(eval_step, model=model, disp=disp, with_dispersion=with_dispersion, lora_scale=lora_scale),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )


def peak_flops() -> float | None:
  """Dense bf16 peak of this accelerator (datasheet), None where unknown (CPU)."""
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def resume_point(cfg: ConfigDict, workdir: str) -> tuple[int | None, dict[str, tuple]]:
  """(the step a run in `workdir` resumes from, None for a fresh run; the settings it changes, key -> (old, new)).
  Reads the latest checkpoint's run config without creating anything; a change of the model or of the meaning of
  the saved state is a ConfigError (config.resume_changes)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None, {}
  reader = Checkpointer.reader(workdir)
  try:
    step = reader.latest_step()
    if step is None:
      return None, {}
    saved = config_lib.from_saved(reader.saved_config(step))
  finally:
    reader.close()
  where = f"the checkpoint of step {step} in {reader.directory}"
  return step, config_lib.resume_changes(saved, cfg, where)


def announce_changes(logger: MetricsLogger, start: int, changed: dict[str, tuple]) -> None:
  """One console line for the settings a resume changes; a warning for those of the objective and the update
  (config.RESUME_ANNOUNCED): the run is trained differently from then on."""
  if not changed:
    return
  what = lambda keys: ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)
  training = [k for k in changed if config_lib.changes_training(k)]
  other = [k for k in changed if k not in training]
  if other:
    logger.write(f"resuming from step {start} with changed settings: {what(other)}")
  if training:
    logger.write(
        f"warning: the run trains with other settings from step {start + 1} on ({what(training)}); metrics.jsonl "
        "records the change (a row of kind 'resume'), and the checkpoints from now on hold the new settings"
    )


def run(cfg: ConfigDict, workdir: str, *, devices: list | None = None, stop_at: int | None = None) -> int:
  """Trains to cfg.steps (or until SIGTERM / SIGINT / `stop_at`, handled alike); returns the last completed step.

  Every check (config, resume, data) runs before anything is written: a run that fails to start leaves no
  workdir behind."""
  with distributed.Preemption() as preempt:  # first: a SIGTERM during set-up still ends in a clean save and exit
    return _run(cfg, workdir, preempt, devices, stop_at)


def _run(cfg: ConfigDict, workdir: str, preempt, devices: list | None, stop_at: int | None) -> int:
  lead = jax.process_index() == 0
  loop_cfg = config_lib.loop_config(cfg)
  mesh = sharding.make_mesh(config_lib.mesh_config(cfg), devices)
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  model = build_model(model_cfg)
  train_fn, tx = step_function(cfg, model_cfg)
  check_vocab(cfg, model_cfg)
  resume_from, changed = resume_point(cfg, workdir)
  ds = open_data(cfg)

  spec, adapters = lora_run.setup(cfg, model_cfg)  # before makedirs: a LoRA setting error creates nothing
  os.makedirs(workdir, exist_ok=True)
  target, shardings = state_shardings(model_cfg, tx, mesh, spec)
  ckpt = Checkpointer(workdir, loop_cfg.max_to_keep)
  try:
    start = ckpt.latest_step()
    if start != resume_from:  # another process wrote a checkpoint meanwhile: check that one
      resume_from, changed = resume_point(cfg, workdir)
    data = train_batches(cfg, ds, mesh, resume_row(ckpt, start, ds))
    with logical_context(mesh):
      if start is None:
        params = pretrained_params(cfg, model_cfg)
        params = (
            None if params is None else jax.device_put(params, shardings.params if spec is None else shardings.frozen)
        )
        adapters = None if adapters is None else jax.device_put(adapters, shardings.params)
        state = jax.jit(lambda p, a: init_state(model_cfg, tx, cfg.seed, p, spec, a), out_shardings=shardings)(
            params, adapters
        )
      else:
        state = restore_state(ckpt, start, cfg, model_cfg, spec, target, shardings)
      record = None if spec is None else lora_run.record(spec, state.frozen)
      step_fn = jit_train_step(train_fn, mesh, shardings)
      eval_fn = jit_eval_step(model, disp, mesh, eval_params(shardings), lora_scale=spec and spec.scale)
      val_batches = validation_batches(cfg, ds, mesh) if loop_cfg.eval_every else []
  except BaseException:
    ckpt.close()
    raise
  start = start or 0
  logger = MetricsLogger(workdir, loop_cfg.steps, start, enabled=lead)
  logger.write(
      f"{'resuming from step ' + str(start) if start else 'starting'}: {model_cfg.n_layer} layers, "
      f"width {model_cfg.n_embd}, mesh {dict(mesh.shape)}, {cfg.batch_size}x{cfg.seq_len} tokens/step"
  )
  resumed = logger.record_resume(start, changed)
  if resumed and resumed["discarded_rows"] and logger.dropped:
    logger.write(
        f"metrics.jsonl: dropped {len(logger.dropped)} rows of steps {start + 1}-{resumed['discarded_through']} "
        f"logged after the checkpoint of step {start} (they are computed again)"
    )
  announce_changes(logger, start, changed)
  base = config_lib.baseline_config(cfg)
  if base.method == "active_forgetting" and loop_cfg.steps < base.forget_every:
    logger.write(
        f"warning: steps={loop_cfg.steps} < baseline.forget_every={base.forget_every}: no reset happens and "
        "the authors' embedding schedule is 0 for the whole run (a frozen input embedding)"
    )
  step_flops = flops_per_token(model_cfg, cfg.seq_len)
  peak = peak_flops()
  last_eval = {}

  def log(step, metrics, tokens_per_s):
    row = {**metrics, "tokens_per_s": tokens_per_s}
    if peak:  # MFU with the FLOP convention of models.flops_per_token (the one bench and the dry run use)
      row["mfu"] = tokens_per_s * step_flops / (peak * mesh.devices.size)
    logger.log(step, row)

  harness_cfg = config_lib.harness_eval_config(cfg)
  harness_eval = None
  if harness_cfg.names:  # lm-evaluation-harness on the live parameters (lm_eval/TASK/METRIC rows)
    harness_eval = harness_tasks.live_evaluator(harness_cfg, model_cfg, cfg.tokenizer, mesh)

  def evaluate(step, state):
    row = validation_metrics(eval_fn, eval_params(state), val_batches)
    row.pop("tokens")
    if harness_eval and (harness_cfg.every is None or step % harness_cfg.every == 0 or step == loop_cfg.steps):
      with logical_context(mesh):
        weights = state.params if spec is None else lora.merge(state.frozen, state.params, spec.scale)  # LoRA: merged
        row.update(harness_eval(weights))
    last_eval.clear()
    last_eval.update(row)
    logger.log(step, row, kind="eval")

  hooks = Hooks(
      log=log,
      evaluate=evaluate,
      advance=logger.advance,
      last_checkpoint=ckpt.latest_step,
      save=lambda step, state: ckpt.save(
          step, trainable(state), data.state(data.rows_consumed(step - start)), cfg.to_dict(), record
      ),
      should_stop=lambda step: distributed.preemption_requested(preempt.requested or step == stop_at, ckpt, step),
  )
  try:
    with logical_context(mesh):
      if start and loop_cfg.evaluates_at(start) and not logger.has(start, "eval"):
        evaluate(start, state)  # killed between the checkpoint and its evaluation: the history needs that row
      out = run_loop(
          step_fn,
          state,
          data.iter_from(0, loop_cfg.steps - start),
          start=start,
          cfg=loop_cfg,
          hooks=hooks,
          tokens_per_step=cfg.batch_size * cfg.seq_len,
      )
  finally:
    ckpt.close()
    logger.close()
  if lead:
    print(summary(workdir, out, last_eval, stop_at), file=sys.stderr, flush=True)
  return out.step


def summary(workdir: str, out, last_eval: dict, stop_at: int | None = None) -> str:
  """What a user needs after a run: where it ended, its losses, where things are, what to run next."""
  lines = []
  if out.preempted:
    how = "stopped" if out.step == stop_at else "preempted"
    lines.append(f"{how} at step {out.step}: checkpoint saved; re-run the same command to resume")
  else:
    lines.append(f"finished step {out.step}")
  if out.last_metrics is not None:
    lines.append(f"  train loss {float(out.last_metrics['loss']):.4f} (ce {float(out.last_metrics['ce']):.4f})")
  if "val_loss" in last_eval:
    lines.append(f"  validation loss {last_eval['val_loss']:.4f} (ppl {last_eval['val_ppl']:.1f})")
  lines.append(f"  checkpoints: {os.path.join(workdir, 'checkpoints')}")
  lines.append(
      f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}; TensorBoard: tensorboard --logdir "
      f"{shlex.quote(os.path.join(workdir, 'tensorboard'))}"
  )
  lines.append(f"  evaluate: python -m dispersion_jax.evaluate --workdir {shlex.quote(workdir)}")
  return "\n".join(lines)


def _open_run(workdir: str, step: int | None) -> tuple[Checkpointer, int]:
  """A reader of a run's checkpoints (it creates nothing) and the step to read: `step`, or the latest one."""
  if not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} is not a directory (a training run's workdir)")
  ckpt = Checkpointer.reader(workdir)
  steps = ckpt.all_steps()
  if step is None and not steps:
    ckpt.close()
    raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first (python -m dispersion_jax.train ...)")
  if step is not None and step not in steps:
    ckpt.close()
    raise CheckpointError(f"no checkpoint of step {step} in {ckpt.directory}; it has steps {steps or 'none'}")
  return ckpt, steps[-1] if step is None else step


def load_run_config(workdir: str, step: int | None = None) -> ConfigDict:
  """The run config a run's (latest) checkpoint was trained with."""
  ckpt, step = _open_run(workdir, step)
  try:
    return config_lib.from_saved(ckpt.saved_config(step))
  finally:
    ckpt.close()


def load_run(workdir: str, step: int | None = None, mesh=None):
  """(run config, model config, train state) of a run's checkpoint, restored onto `mesh` (None: one device).

  The config is the checkpoint's own copy: the run's one record of how it was trained. A LoRA run's state has its
  base weights (re-read from init_from, or re-drawn from the seed, and checked) in `frozen`.
  """
  cfg, model_cfg, state, _ = _load(workdir, step, mesh)
  return cfg, model_cfg, state


def _load(workdir: str, step: int | None, mesh):
  ckpt, step = _open_run(workdir, step)
  try:
    cfg = config_lib.from_saved(ckpt.saved_config(step))
    model_cfg = config_lib.model_config(cfg)
    tx, _, _ = optimizer_and_step(cfg, model_cfg)
    if mesh is None:
      mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    record = ckpt.lora(step)
    spec = None if record is None else lora_run.spec_of(record)
    target, shardings = state_shardings(model_cfg, tx, mesh, spec)
    state = restore_state(ckpt, step, cfg, model_cfg, spec, target, shardings)
  finally:
    ckpt.close()
  return cfg, model_cfg, state, spec


def load_weights(workdir: str, step: int | None = None):
  """(run config, model config, the model's weights) of a run's checkpoint on one device: a LoRA run's adapters
  merged into its base (lora.merge, float32), what evaluation and --hf_export read."""
  cfg, model_cfg, state, spec = _load(workdir, step, None)
  params = (
      state.params
      if spec is None
      else jax.jit(functools.partial(lora.merge, scale=spec.scale))(state.frozen, state.params)
  )
  return cfg, model_cfg, params


def load_lora(workdir: str, step: int | None = None):
  """(run config, model config, LoraSpec, adapters) of a LoRA run's checkpoint (--peft_export)."""
  cfg, model_cfg, state, spec = _load(workdir, step, None)
  if spec is None:
    raise ConfigError(f"{workdir} is a full fine-tuning run (lora.rank=0): it has no adapters to export")
  return cfg, model_cfg, spec, state.params


def load_params(workdir: str, step: int | None = None):
  """(model config, params) of a run's checkpoint on the default device (for the evaluation tools)."""
  _, model_cfg, params = load_weights(workdir, step)
  return model_cfg, params


if __name__ == "__main__":  # the command line lives in cli/train.py; this keeps `python -m dispersion_jax.train`
  from dispersion_jax.cli.train import main

  main()
