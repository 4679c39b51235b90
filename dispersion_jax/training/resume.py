"""Resuming a run: where it resumes (the latest checkpoint and its data position) and which settings may change.

The run config of a resumed run is compared with its checkpoint's, key by key (`resume_changes`): layout,
cadence and where the data lives may change; the objective and the optimizer may change on purpose (announced and
recorded); anything that changes the model or the meaning of the saved state is refused in one line.
"""

import shlex
from collections.abc import Sequence

from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.config import _flat, from_saved, model_config
from dispersion_jax.data import loader
from dispersion_jax.data.packed import PackedDataset
from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import paths
from dispersion_jax.training.checkpoint import Checkpointer
from dispersion_jax.training.metrics import MetricsLogger

# Settings a resumed run may change: how long it runs and how often it logs, evaluates and saves; how the work is
# laid out (the data position is the rows consumed, so mesh, global batch and micro-batching may change: elastic
# resume); where the data lives (its identity is the dataset fingerprint, checked on resume); implementation
# choices that compute the same function. Every other key (the model, seq_len, tokenizer, seed: the data order,
# data source, baseline, init_from) decides what the model computes or what the saved state means: a resume that
# changes one is refused.
RESUME_MAY_CHANGE = (
    "steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "max_to_keep",
    "checkpoint_timeout_s",
    "batch_size",
    "grad_accum",
    "grad_accum_headroom",
    "memory_limit_gb",
    "ce_chunk",
    "dry_run",
    "dry_run_memory_budget_gb",
    "mesh.*",
    "model.remat",
    "model.attention",
    "data.text_dir",
    "data.data_dir",
    "data.cache_dir",
    "data.staging_dir",
    "data.read_threads",
    "data.build_workers",
)
# The objective and the update rule may change on purpose for the rest of a run: the dispersion term (turning it on,
# or changing its coefficient, as mid-training does) and the optimizer's settings (a lower optimizer.lr after a
# non-finite loss, as that error advises). Allowed, announced on the console and recorded in metrics.jsonl (a
# `resume` row). Except optimizer.clip between None and a value: it changes the optimizer state's structure.
RESUME_ANNOUNCED = ("dispersion.*", "optimizer.*")


def _matches(key: str, patterns: Sequence[str]) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def changes_training(key: str) -> bool:
  """Whether a resume that changes `key` trains on differently (the objective or the update: RESUME_ANNOUNCED)."""
  return _matches(key, RESUME_ANNOUNCED)


def flag(key: str, value) -> str:
  """The command-line flag that sets `key` to `value` (`--config.model.n_head=4`)."""
  return shlex.quote(f"--config.{key}={value}")


def resume_changes(saved: ConfigDict, cfg: ConfigDict, where: str) -> dict[str, tuple]:
  """The settings that differ between a checkpoint's run config (`saved`, config_lib.from_saved) and this run's:
  {key: (saved value, new value)} for the keys a resume may change (RESUME_MAY_CHANGE, RESUME_ANNOUNCED). Any
  other difference is a ConfigError naming every such key and the flags that keep the run's values. `where`
  names the checkpoint in the message."""
  old, new = _flat(saved), _flat(from_saved(cfg.to_dict()))  # both normalised alike (e.g. eval_every 0 = None)
  diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
  model_keys = [k for k in diff if k.startswith("model.") and not _matches(k, RESUME_MAY_CHANGE)]
  if model_keys and _same_model(saved, cfg):  # spelled differently, the same model (e.g. a preset's own n_head)
    for k in model_keys:
      diff.pop(k)
  refused = [
      k
      for k in diff
      if not _matches(k, RESUME_MAY_CHANGE + RESUME_ANNOUNCED)
      or (k == "optimizer.clip" and (diff[k][0] is None) != (diff[k][1] is None))
  ]
  if refused:
    what = ", ".join(f"{k} (checkpoint {diff[k][0]!r}, now {diff[k][1]!r})" for k in refused)
    keep = " ".join(flag(k, diff[k][0]) for k in refused)
    raise ConfigError(
        f"{where} was trained with other settings that change the model or the meaning of its state: {what}; "
        f"resume with the run's values ({keep}) or train into a new --workdir"
    )
  return diff


def _same_model(saved: ConfigDict, cfg: ConfigDict) -> bool:
  """Whether both configs resolve to the same model (the keys a resume may change taken from `cfg`)."""
  saved = ConfigDict(saved.to_dict())
  for key in ("remat", "attention"):
    saved.model[key] = cfg.model[key]
  try:
    return model_config(saved) == model_config(cfg)
  except ConfigError:
    return False


def resume_row(ckpt: Checkpointer, step: int | None, ds: PackedDataset) -> int:
  """Where in the data stream a run resumes: the checkpoint's rows consumed (checked against the dataset), or,
  for a checkpoint of an earlier version (Grain iterator state), step x its global batch."""
  if step is None:
    return 0
  state = ckpt.data_state(step)
  if state is None:
    return loader.legacy_rows_consumed(step, config_lib.from_saved(ckpt.saved_config(step)).batch_size)
  return loader.check_resume(state, ds)


def resume_point(cfg: ConfigDict, workdir: str) -> tuple[int | None, dict[str, tuple]]:
  """(the step a run in `workdir` resumes from, None for a fresh run; the settings it changes, key -> (old, new)).
  Reads the latest checkpoint's run config without creating anything; a change of the model or of the meaning of
  the saved state is a ConfigError (resume_changes)."""
  if not paths.is_dir(paths.join(workdir, "checkpoints")):
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
  return step, resume_changes(saved, cfg, where)


def announce_changes(logger: MetricsLogger, start: int, changed: dict[str, tuple]) -> None:
  """One console line for the settings a resume changes; a warning for those of the objective and the update
  (RESUME_ANNOUNCED): the run is trained differently from then on."""
  if not changed:
    return
  what = lambda keys: ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)
  training = [k for k in changed if changes_training(k)]
  other = [k for k in changed if k not in training]
  if other:
    logger.write(f"resuming from step {start} with changed settings: {what(other)}")
  if training:
    logger.write(
        f"warning: the run trains with other settings from step {start + 1} on ({what(training)}); metrics.jsonl "
        "records the change (a row of kind 'resume'), and the checkpoints from now on hold the new settings"
    )
