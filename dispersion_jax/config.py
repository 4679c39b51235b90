"""The run configuration: one schema, typed overrides, validation, and the typed configs each layer takes.

Config files are Python: `get_config()` returns an `ml_collections.ConfigDict` built from `default_config()`.
Every setting has one default, the one of the dataclass that consumes it (`OptimizerConfig`, `MeshConfig`,
`DispersionConfig`, `LoopConfig`, ...); the sections of the schema are generated from those dataclasses. This
module alone turns the ConfigDict into them: functions below it take only the dataclass they read. A bad key,
value or combination is a ConfigError with one line that names the key, before anything compiles.
"""

import ast
import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Sequence

from flax import traverse_util
from ml_collections import ConfigDict, FieldReference

from dispersion_jax import models
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import ConfigError
from dispersion_jax.evaluation.harness_tasks import HarnessEvalConfig
from dispersion_jax.losses.objective import DispersionConfig
from dispersion_jax.models.lora import LoraConfig
from dispersion_jax.parallel import backend
from dispersion_jax.parallel.sharding import MeshConfig
from dispersion_jax.training.baselines import BaselineConfig
from dispersion_jax.training.loop import LoopConfig
from dispersion_jax.training.optim import OptimizerConfig

_MODEL_SHAPE_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_kv_head",
    "head_dim",
    "rope_theta",
    "tie_embeddings",
)
# Old spellings accepted for one release: key -> its new place.
ALIASES = {"dispersion.ce_chunk": "ce_chunk"}


def _field_type(cls, name: str) -> type:
  """The concrete type of a dataclass field (`int | None` -> int), for typed command-line overrides."""
  hint = typing.get_type_hints(cls)[name]
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  return hint


def _section(cls, skip: Sequence[str] = ()) -> ConfigDict:
  """A schema section from a config dataclass: its fields, their defaults, their types (None defaults typed)."""
  c = ConfigDict()
  for f in dataclasses.fields(cls):
    if f.name in skip:
      continue
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    c[f.name] = FieldReference(default, field_type=_field_type(cls, f.name))
  return c


def default_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, in sequences (per optimizer step)
  c.seq_len = 256
  # micro-batches per step (batch_size must divide by it), or "auto": the fewest whose compiled step fits the device
  # with grad_accum_headroom to spare, chosen before the first step (compile/auto_accum.py) and kept by a resume
  c.grad_accum = FieldReference(1, field_type=object)
  c.grad_accum_headroom = 0.1  # grad_accum=auto: keep this fraction of the device's memory free
  c.memory_limit_gb = FieldReference(None, field_type=float)  # grad_accum=auto: GiB per device; None = the device's
  c.tokenizer = "gpt2"  # "gpt2" (offline BPE) or a Hugging Face tokenizer directory
  c.init_from = FieldReference(None, field_type=str)  # a Hugging Face model directory to mid-train from
  c.ce_chunk = FieldReference(None, field_type=int)  # fused LM head + CE in chunks of this many tokens; None = plain
  c.dry_run = False  # compile the step, print memory and FLOPs, exit
  c.dry_run_memory_budget_gb = FieldReference(None, field_type=float)  # dry run: fail above this many GiB/device
  c.dry_run_target = ""  # dry run: compile for a TPU slice / GPU node (v5e-8, v5p-8, h100-8x4; dry_run.py), "" = local
  c.dry_run_slices = 1  # dry run: that many TPU slices over DCN (multi-slice)
  c.dry_run_twin = True  # dry run: also compile the coeff-0 twin (the dispersion term's share); False halves the time
  c.update(_section(LoopConfig).to_dict())  # steps, log_every, eval_every, eval_batches, checkpoint_every, ...

  c.model = ConfigDict()
  c.model.family = "gpt2"  # gpt2 | qwen3
  c.model.preset = "tiny"
  for key in _MODEL_SHAPE_KEYS:  # None = take the preset's (or init_from's) value
    c.model[key] = FieldReference(None, field_type=_shape_type(key))
  c.model.dropout = 0.0
  c.model.dtype = "auto"  # compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU
  c.model.param_dtype = "float32"
  c.model.remat = "none"  # none | full | minimal | dots (models/remat.py: what each saves)
  c.model.scan_layers = False
  c.model.attention = "auto"  # auto = cuDNN flash attention on GPU, the splash kernel on TPU (bf16), XLA elsewhere
  c.model.document_mask = False  # attend within each packed document only (the batch's segment ids)

  c.dispersion = _section(DispersionConfig)
  c.optimizer = _section(OptimizerConfig)
  c.mesh = _section(MeshConfig)  # sizes; -1 = all remaining devices
  c.data = _section(DataConfig)
  c.baseline = _section(BaselineConfig)  # the paper's other counter-condensation methods (baselines.py)
  c.eval = _section(HarnessEvalConfig)  # lm-evaluation-harness tasks at evaluations (harness_tasks.py)
  c.lora = _section(LoraConfig)  # LoRA adapters on a frozen base (lora.py); rank 0 = full fine-tuning
  return c


def _shape_type(key: str) -> type:
  return {"rope_theta": float, "tie_embeddings": bool}.get(key, int)


def _flat(cfg: ConfigDict) -> dict[str, object]:
  return traverse_util.flatten_dict(cfg.to_dict(), sep=".")


def load_module(path: str, example: str = "configs/gpt2_tiny.py"):
  """A Python config file (run or sweep) as a module with get_config()."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found; pass e.g. --config {example}")
  spec = importlib.util.spec_from_file_location(f"_dispersion_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} must define get_config() returning an ml_collections.ConfigDict")
  return module


def load_config(path: str) -> ConfigDict:
  """The ConfigDict of a config file (unknown keys rejected), without overrides or validation."""
  cfg = load_module(path).get_config()
  unknown = sorted(set(_flat(cfg)) - set(_flat(default_config())))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r} in {path}; see dispersion_jax/config.py for the keys")
  return cfg


def load(path: str, overrides: Sequence[str | tuple[str, str]] = ()) -> ConfigDict:
  """A config file plus `KEY=VALUE` overrides (typed by the schema); not yet validated against devices."""
  cfg = load_config(path)
  for item in overrides:
    key, _, text = item.partition("=") if isinstance(item, str) else (item[0], "=", item[1])
    apply_override(cfg, key, text)
  return cfg


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
  """Set `key` (dotted) from its command-line text, typed by the schema."""
  key = ALIASES.get(key, key)
  schema = default_config()
  if key not in _flat(schema):
    raise ConfigError(f"unknown config key {key!r} (from --config.{key}); see dispersion_jax/config.py")
  *parents, leaf = key.split(".")
  node, ref_node = cfg, schema
  for p in parents:
    node, ref_node = node[p], ref_node[p]
  field = ref_node._fields[leaf]
  want = field.get_type() if isinstance(field, FieldReference) else type(ref_node[leaf])
  node[leaf] = parse_value(text, want, key)


def parse_value(text: str, want: type, key: str):
  """Command-line text -> a value of type `want`; `None` is accepted for every key (`none` too, except for
  string keys, where it is a value: model.remat=none)."""
  if text in ("None", "null") or (text == "none" and want is not str):
    return None
  if want is object and text == "auto":  # grad_accum=auto
    return text
  if want is object:
    want = int
  if want is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if want is str:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}={text}: expected a {want.__name__}") from None
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, want) or isinstance(value, bool):
    raise ConfigError(f"--config.{key}={text}: expected a {want.__name__}, got {type(value).__name__}")
  return value


def validate(cfg: ConfigDict, num_devices: int | None = None) -> None:
  """Impossible combinations, caught before compiling: every typed config is built once here."""

  def need(ok: bool, msg: str):
    if not ok:
      raise ConfigError(msg)

  auto = cfg.grad_accum == "auto"
  need(auto or isinstance(cfg.grad_accum, int), f"grad_accum={cfg.grad_accum!r} must be an integer or 'auto'")
  for key in ("batch_size", "seq_len") + (() if auto else ("grad_accum",)):
    need(cfg[key] >= 1, f"{key}={cfg[key]} must be >= 1")
  need(
      auto or cfg.batch_size % cfg.grad_accum == 0,
      f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum}",
  )
  need(0 <= cfg.grad_accum_headroom < 1, f"grad_accum_headroom={cfg.grad_accum_headroom} must be in [0, 1)")
  need(
      cfg.memory_limit_gb is None or cfg.memory_limit_gb > 0,
      f"memory_limit_gb={cfg.memory_limit_gb} must be > 0 or None (the device's)",
  )
  need(cfg.ce_chunk is None or cfg.ce_chunk >= 1, f"ce_chunk={cfg.ce_chunk} must be >= 1 or None (plain CE)")
  need(
      cfg.dry_run_memory_budget_gb is None or cfg.dry_run_memory_budget_gb >= 0,
      f"dry_run_memory_budget_gb={cfg.dry_run_memory_budget_gb} must be >= 0 or None (no check)",
  )
  need(
      not cfg.dry_run_target or cfg.dry_run,
      f"dry_run_target={cfg.dry_run_target} compiles only: add --config.dry_run=True (train on the target itself)",
  )
  need(
      cfg.init_from is None or os.path.isdir(cfg.init_from),
      f"init_from={cfg.init_from}: no such directory (a Hugging Face model directory)",
  )
  loop_config(cfg), optimizer_config(cfg), dispersion_config(cfg), data_config(cfg), model_config(cfg)
  harness_eval = harness_eval_config(cfg)
  need(
      not harness_eval.tasks or bool(cfg.eval_every),
      f"eval.tasks={harness_eval.tasks!r} runs at evaluations: set eval_every (it is {cfg.eval_every})",
  )
  need(
      harness_eval.every is None or not cfg.eval_every or harness_eval.every % cfg.eval_every == 0,
      f"eval.every={harness_eval.every} must be a multiple of eval_every={cfg.eval_every}",
  )
  base = baseline_config(cfg)
  need(
      base.method == "none" or cfg.dispersion.coeff == 0 or base.with_dispersion,
      f"baseline.method={base.method!r} with dispersion.coeff={cfg.dispersion.coeff}: the authors' baselines are CE "
      "only; set dispersion.coeff=0, or baseline.with_dispersion=True to combine them on purpose",
  )
  validate_lora(cfg)
  mesh = mesh_config(cfg)
  if num_devices is not None:
    shape = mesh.shape(num_devices)
    dp = shape["data"] * shape["fsdp"]
    need(
        not auto or cfg.batch_size % dp == 0,
        f"batch_size={cfg.batch_size} must be divisible by the data-parallel size mesh.data*mesh.fsdp={dp}",
    )
    if not auto:
      need(
          (cfg.batch_size // cfg.grad_accum) % dp == 0,
          f"batch_size/grad_accum={cfg.batch_size // cfg.grad_accum} must be divisible by the data-parallel size "
          f"mesh.data*mesh.fsdp={dp}",
      )


def _typed(cls, section: ConfigDict | dict, where: str):
  try:
    return cls(**(section.to_dict() if isinstance(section, ConfigDict) else section))
  except (ValueError, TypeError) as e:  # the dataclasses' own checks: one line naming the key
    msg = str(e)
    raise ConfigError(msg if where in msg or "." in msg.split("=")[0] else f"{where}: {msg}") from None


def compute_dtype(cfg: ConfigDict) -> str:
  if cfg.model.dtype != "auto":
    return cfg.model.dtype
  return "float32" if backend.current() == "cpu" else "bfloat16"  # a dry-run target's backend, if any


def model_config(cfg: ConfigDict):
  """The model family's config (GPTConfig, Qwen3Config): preset, shape overrides, or init_from's config.json."""
  m = cfg.model
  if m.family not in models.FAMILIES:
    raise ConfigError(f"model.family={m.family!r}: use one of {', '.join(models.FAMILIES)}")
  opts = dict(
      dropout=m.dropout,
      dtype=compute_dtype(cfg),
      param_dtype=m.param_dtype,
      remat=m.remat,
      scan_layers=m.scan_layers,
      attention=m.attention,
      document_mask=m.document_mask,
      lora_dropout=lora_dropout(cfg),
  )
  shape = {k: m[k] for k in _MODEL_SHAPE_KEYS if m[k] is not None}
  if cfg.init_from:
    from dispersion_jax.interop import hf  # noqa: PLC0415 - safetensors I/O only when mid-training

    if shape:
      raise ConfigError(
          f"model.{next(iter(shape))} cannot be set with init_from: the shape comes from "
          f"{cfg.init_from}/config.json"
      )
    try:
      return hf.config_from_json(cfg.init_from, **opts)
    except ValueError as e:
      raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
  family = models.FAMILIES[m.family]
  fields = {f.name for f in dataclasses.fields(family.Config)}
  extra = sorted(set(shape) - fields)
  if extra:
    raise ConfigError(f"model.{extra[0]} does not apply to model.family={m.family!r}; remove it")
  opts = {k: v for k, v in opts.items() if k in fields}
  try:
    return family.Config.preset(m.preset, **shape, **opts)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model: {e}") from None


def dispersion_config(cfg: ConfigDict) -> DispersionConfig:
  return _typed(DispersionConfig, cfg.dispersion, "dispersion")


def optimizer_config(cfg: ConfigDict) -> OptimizerConfig:
  return _typed(OptimizerConfig, cfg.optimizer, "optimizer")


def mesh_config(cfg: ConfigDict) -> MeshConfig:
  return _typed(MeshConfig, cfg.mesh, "mesh")


def data_config(cfg: ConfigDict) -> DataConfig:
  return _typed(DataConfig, cfg.data, "data")


def baseline_config(cfg: ConfigDict) -> BaselineConfig:
  return _typed(BaselineConfig, cfg.baseline, "baseline")


def harness_eval_config(cfg: ConfigDict) -> HarnessEvalConfig:
  return _typed(HarnessEvalConfig, cfg.eval, "eval")


def lora_config(cfg: ConfigDict) -> LoraConfig:
  return _typed(LoraConfig, cfg.lora, "lora")


def lora_dropout(cfg: ConfigDict) -> float:
  """The adapters' input dropout (a model option): lora.dropout, else the init_from adapter's, else 0 (also where
  the adapter directory is gone: evaluating a finished run needs no dropout; training checks it in validate_lora)."""
  lora = lora_config(cfg)
  if not lora.enabled or lora.dropout is not None or not os.path.isdir(lora.init_from or ""):
    return (lora.dropout or 0.0) if lora.enabled else 0.0
  from dispersion_jax.interop import peft  # noqa: PLC0415 - adapter files only with lora.init_from

  try:
    return float(peft.read_config(lora.init_from).get("lora_dropout") or 0.0)
  except (ValueError, OSError) as e:
    raise ConfigError(f"lora.init_from={lora.init_from}: {e}") from None


def validate_lora(cfg: ConfigDict) -> None:
  lora = lora_config(cfg)
  if lora.init_from is not None and not os.path.isdir(lora.init_from):
    raise ConfigError(f"lora.init_from={lora.init_from}: no such directory (a PEFT adapter directory)")
  if lora.enabled and cfg.baseline.method == "active_forgetting":
    raise ConfigError(
        "baseline.method='active_forgetting' re-draws the input embedding, which LoRA freezes; set lora.rank=0"
    )


def loop_config(cfg: ConfigDict) -> LoopConfig:
  return _typed(LoopConfig, {f.name: cfg[f.name] for f in dataclasses.fields(LoopConfig)}, "config")


def from_saved(saved: dict) -> ConfigDict:
  """The run config stored in a checkpoint, on top of today's schema (keys added since then keep their default)."""
  cfg = default_config()
  flat = traverse_util.flatten_dict(saved, sep=".")
  for key, value in flat.items():
    key = ALIASES.get(key, key)
    if key in ("data.shards", "data.worker_count"):  # settings of the old data pipeline: nothing to carry
      continue
    if key == "optimizer.clip" and value == 0:
      value = None
    if key in ("eval_every", "dry_run_memory_budget_gb") and value == 0:
      value = None
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    if leaf in node:
      node[leaf] = value
  return cfg
