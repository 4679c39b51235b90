"""A training run from a validated run config: mesh, model, data, state, checkpoints, then the loop (loop.py).

Pre-trains (or mid-trains, with init_from) a model with CE + coeff * dispersion. Running it again with the same
workdir resumes exactly from the latest checkpoint (train state + data position), on any process count or mesh. The command line is
`python -m dispersion_jax train` (cli/train.py).
"""

import functools
import shlex
import sys

import jax
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import models
from dispersion_jax.data import build, loader
from dispersion_jax.data.packed import PackedDataset
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import ConfigError, DataError, StorageUnavailableError
from dispersion_jax.evaluation import harness_tasks
from dispersion_jax.models import build_model, flops_per_token, lora
from dispersion_jax.parallel import distributed, sharding
from dispersion_jax.storage import bucket, paths
from dispersion_jax.training import lora_state
from dispersion_jax.training.baselines import Forgetting
from dispersion_jax.training.checkpoint import Checkpointer
from dispersion_jax.training.loop import Hooks, run_loop
from dispersion_jax.training.metrics import MetricsLogger, history_location
from dispersion_jax.training.optim import lr_schedule, make_optimizer
from dispersion_jax.training.resume import announce_changes, resume_point, resume_row
from dispersion_jax.training.train_step import (
  base_params,
  eval_params,
  init_state,
  jit_train_step,
  logical_context,
  state_shardings,
  train_step,
  trainable,
)
from dispersion_jax.training.validation import jit_eval_step, validation_batches, validation_metrics

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5": 197e12, "TPU v4": 275e12}  # dense bf16


def open_data(cfg: ConfigDict) -> PackedDataset:
  """The run's pre-packed dataset. The embedded corpus is built on first use (by process 0; the others wait and
  open it); any other source must have been built (`python -m dispersion_jax data-build`, a DataError says so)."""
  data_cfg, lead = config_lib.data_config(cfg), jax.process_index() == 0

  def open_():
    return build.open_or_build_default(data_cfg, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, progress=lead)

  ds = open_() if lead else None
  distributed.barrier("dataset_built")
  return ds if lead else open_()


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
  spec, _ = lora_state.setup(cfg, model_cfg)
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
  record = lora_state.check_setting(ckpt, step, spec)
  state = ckpt.restore(step, trainable(target))
  if spec is None:
    return state
  base = frozen_base(cfg, model_cfg, shardings.frozen)
  lora_state.check_base(record, base, f"checkpoint {ckpt.directory}/{step}")
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
  from dispersion_jax.interop import hf  # noqa: PLC0415 - safetensors only when mid-training

  try:
    return hf.load_pretrained(cfg.init_from, param_dtype=model_cfg.param_dtype)[1]
  except (ValueError, OSError) as e:
    raise DataError(f"init_from={cfg.init_from}: {e}") from None


def peak_flops() -> float | None:
  """Dense bf16 peak of this accelerator (datasheet), None where unknown (CPU)."""
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def run(cfg: ConfigDict, workdir: str, *, devices: list | None = None, stop_at: int | None = None) -> int:
  """Trains to cfg.steps (or until SIGTERM / SIGINT / `stop_at`, handled alike); returns the last completed step.

  Every check (config, resume, data) runs before anything is written: a run that fails to start leaves no
  workdir behind."""
  with distributed.Preemption() as preempt:  # first: a SIGTERM during set-up still ends in a clean save and exit
    return _run(cfg, workdir, preempt, devices, stop_at)


def check_locations(cfg: ConfigDict, workdir: str) -> None:
  """Every path of a run is one it can use (a local path or gs://; s3:// is one line naming the fix), and a gs://
  workdir's bucket exists and takes writes: checked before anything is compiled or written."""
  paths.path(workdir, what="--workdir")
  for what, value in (("init_from", cfg.init_from), ("lora.init_from", cfg.lora.init_from)):
    if value:
      paths.path(value, what=what)
  bucket.check_writable(workdir, what="--workdir")
  distributed.check_shared_workdir(workdir)  # multi-process: one directory for all, or one line (never a hang)


def _run(cfg: ConfigDict, workdir: str, preempt, devices: list | None, stop_at: int | None) -> int:
  lead = jax.process_index() == 0
  check_locations(cfg, workdir)
  loop_cfg = config_lib.loop_config(cfg)
  mesh = sharding.make_mesh(config_lib.mesh_config(cfg), devices)
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  model = build_model(model_cfg)
  train_fn, tx = step_function(cfg, model_cfg)
  check_vocab(cfg, model_cfg)
  resume_from, changed = resume_point(cfg, workdir)
  ds = open_data(cfg)

  spec, adapters = lora_state.setup(cfg, model_cfg)  # before makedirs: a LoRA setting error creates nothing
  paths.path(workdir).mkdir(parents=True, exist_ok=True)  # a bucket has no folders: nothing to create there
  target, shardings = state_shardings(model_cfg, tx, mesh, spec)
  ckpt = Checkpointer(workdir, loop_cfg.max_to_keep, timeout_s=loop_cfg.checkpoint_timeout_s)
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
      record = None if spec is None else lora_state.record(spec, state.frozen)
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
      save=lambda step, state: (
          ckpt.save(step, trainable(state), data.state(data.rows_consumed(step - start)), cfg.to_dict(), record),
          logger.flush(),
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
    try:
      ckpt.close()
    finally:  # the storage does not answer (the exception on its way out, the run's or close's): no upload
      logger.close(upload=not isinstance(sys.exc_info()[1], StorageUnavailableError))
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
  lines.append(f"  checkpoints: {paths.join(workdir, 'checkpoints')}")
  lines.append(
      f"  metrics: {history_location(workdir)}; TensorBoard: tensorboard --logdir "
      f"{shlex.quote(paths.join(workdir, 'tensorboard'))}"
  )
  lines.append(f"  evaluate: python -m dispersion_jax eval --workdir {shlex.quote(workdir)}")
  return "\n".join(lines)
