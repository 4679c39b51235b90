"""A finished (or interrupted) run, read back: its run config, model and weights from a checkpoint, for the tools that
evaluate, export or study a run after training (evaluate, generate, condensation, sweeps). Reading creates nothing.
"""

import functools

import jax
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.errors import CheckpointError, ConfigError
from dispersion_jax.models import lora
from dispersion_jax.parallel import sharding
from dispersion_jax.storage import paths
from dispersion_jax.training import lora_state
from dispersion_jax.training.checkpoint import Checkpointer
from dispersion_jax.training.train import optimizer_and_step, restore_state
from dispersion_jax.training.train_step import state_shardings


def _open_run(workdir: str, step: int | None) -> tuple[Checkpointer, int]:
  """A reader of a run's checkpoints (it creates nothing) and the step to read: `step`, or the latest one."""
  if not paths.is_dir(workdir, what="--workdir"):
    raise CheckpointError(f"--workdir {workdir} is not a directory (a training run's workdir)")
  ckpt = Checkpointer.reader(workdir)
  steps = ckpt.all_steps()
  if step is None and not steps:
    ckpt.close()
    raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first (python -m dispersion_jax train ...)")
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
    spec = None if record is None else lora_state.spec_of(record)
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
