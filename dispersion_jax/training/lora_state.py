"""LoRA in a training run (lora.py has the adapters themselves): the run config's `lora.*` resolved against the model
and an init_from PEFT adapter, and what a LoRA checkpoint records beside the train state (the resolved setting and
a fingerprint of the frozen base weights, which are not saved), checked on resume.
"""

from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import models
from dispersion_jax.errors import CheckpointError, ConfigError, DataError
from dispersion_jax.interop import peft
from dispersion_jax.models import lora
from dispersion_jax.training.checkpoint import Checkpointer


def setup(cfg: ConfigDict, model_cfg) -> tuple[lora.LoraSpec | None, dict | None]:
  """The run's resolved LoRA setting and, with lora.init_from, the PEFT adapters it starts from; (None, None) for
  full fine-tuning (lora.rank 0)."""
  lora_cfg = config_lib.lora_config(cfg)
  if not lora_cfg.enabled:
    return None, None
  loaded = None
  if lora_cfg.init_from:
    try:
      loaded = peft.load_adapter(lora_cfg.init_from, model_cfg)
    except (ValueError, OSError) as e:
      raise DataError(f"lora.init_from={lora_cfg.init_from}: {e}") from None
  try:
    spec = lora.resolve(lora_cfg, model_cfg, models.param_shapes(model_cfg), loaded)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return spec, None if loaded is None else loaded[1]


def record(spec: lora.LoraSpec, base) -> dict:
  """What a LoRA checkpoint stores besides the state: the resolved setting and the base weights' fingerprint."""
  return {
      "rank": spec.rank,
      "alpha": spec.alpha,
      "dropout": spec.dropout,
      "targets": ["/".join(t) for t in spec.targets],
      "base_fingerprint": lora.fingerprint(base),
  }


def spec_of(rec: dict) -> lora.LoraSpec:
  targets = tuple(tuple(t.split("/")) for t in rec["targets"])
  return lora.LoraSpec(rec["rank"], rec["alpha"], rec["dropout"], targets)


def check_setting(ckpt: Checkpointer, step: int, spec: lora.LoraSpec | None) -> dict | None:
  """The checkpoint's LoRA record, after checking that it was written with this LoRA setting (or none)."""
  rec = ckpt.lora(step)
  if (rec is None) != (spec is None) or (rec is not None and spec_of(rec) != spec):
    raise CheckpointError(
        f"checkpoint {ckpt.directory}/{step} was written with "
        f"{'lora.rank=0' if rec is None else 'other lora.* settings' if spec else 'LoRA adapters'} unlike this "
        "config; resume with the run's lora.* settings or use a new --workdir"
    )
  return rec


def check_base(rec: dict, base, where: str) -> None:
  """CheckpointError (one line) unless `base` has the fingerprint the checkpoint was trained on."""
  changed = lora.fingerprint_mismatch(rec["base_fingerprint"], lora.fingerprint(base))
  if changed is not None:
    raise CheckpointError(
        f"the base weights differ from those {where} was trained on ({changed} changed): resume with the run's "
        "init_from, model.param_dtype and seed, or use a new --workdir"
    )
