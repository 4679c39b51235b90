"""The run configuration: one schema with every key, config files that fill it, `--config.KEY=VALUE` overrides.

Config files in `configs/` define `get_config() -> ml_collections.ConfigDict`, usually by editing
`default_config()`. A key the schema lacks, a value of the wrong type or an impossible combination stops the run
with one line that names the key (ConfigError), before anything compiles.
"""
import ast
import importlib.util
import os

import jax
from ml_collections import ConfigDict, FieldReference
from ml_collections.config_dict import placeholder

from dispersion_jax.dispersion import VARIANTS
from dispersion_jax.errors import ConfigError
from dispersion_jax.models.gpt2 import ATTENTION_IMPLS, PRESETS, REMAT_POLICIES, GPTConfig
from dispersion_jax.objective import LOCS, DispersionConfig

_MODEL_SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")




def default_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.steps = 1000
  c.batch_size = 32                   # global, in sequences (per optimizer step)
  c.seq_len = 256
  c.grad_accum = 1                    # micro-batches per step; batch_size must divide by it
  c.log_every = 10
  c.eval_every = 200                  # 0 = never
  c.eval_batches = 8
  c.checkpoint_every = 200
  c.max_to_keep = 3
  c.tokenizer = "gpt2"                # "gpt2" (offline BPE) or a Hugging Face tokenizer directory
  c.init_from = placeholder(str)      # a Hugging Face GPT-2 directory to mid-train from
  c.dry_run = False                   # compile the step, print memory and FLOPs, exit
  c.dry_run_memory_budget_gb = 0.0    # dry run: fail if a device needs more GiB than this; 0 = no check

  c.model = ConfigDict()
  c.model.preset = "tiny"
  for key in _MODEL_SHAPE_KEYS:       # None = take the preset's (or init_from's) value
    c.model[key] = placeholder(int)
  c.model.dropout = 0.0
  c.model.dtype = "auto"              # compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU
  c.model.param_dtype = "float32"
  c.model.remat = "none"
  c.model.scan_layers = False
  c.model.attention = "auto"          # auto = cuDNN flash attention on GPU (bf16), XLA elsewhere

  c.dispersion = ConfigDict()
  d = DispersionConfig()
  c.dispersion.variant = d.variant
  c.dispersion.coeff = 0.1
  c.dispersion.loc = d.loc
  c.dispersion.tau_l2 = d.tau_l2
  c.dispersion.tau_cos = d.tau_cos
  c.dispersion.margin = d.margin
  c.dispersion.epsilon = d.epsilon
  c.dispersion.clamp_threshold = d.clamp_threshold
  c.dispersion.max_tokens = placeholder(int)   # None = all tokens
  c.dispersion.doc_mask = False
  c.dispersion.block_size = FieldReference(d.block_size, field_type=int)  # rows per block; None = dense
  c.dispersion.ce_chunk = placeholder(int)     # fused LM head + CE in chunks of this many tokens; None = plain

  c.optimizer = ConfigDict()
  c.optimizer.lr = 3e-4
  c.optimizer.warmup = 0.1            # < 1: fraction of `steps`; >= 1: number of steps
  c.optimizer.min_lr_ratio = 0.1      # cosine decays to lr * min_lr_ratio
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_embeddings = True  # biases and layer norms are never decayed
  c.optimizer.clip = 1.0              # global gradient norm; 0 = off

  c.mesh = ConfigDict()               # sizes; -1 = all remaining devices
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.data = ConfigDict()
  c.data.source = "default"           # default (embedded corpus) | text_dir | tfds
  c.data.text_dir = ""
  c.data.tfds_name = ""               # e.g. wikitext/wikitext-103-raw-v1, prepared in data_dir
  c.data.text_key = "text"
  c.data.data_dir = placeholder(str)  # TFDS data dir; None = TFDS's default
  c.data.validation_split = "validation"
  c.data.worker_count = 0
  c.data.shards = 0                   # document shards; 0 = one per process; fixed = same data at any process count
  return c


def load_config(path: str) -> ConfigDict:
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found; pass e.g. --config configs/gpt2_tiny.py")
  spec = importlib.util.spec_from_file_location("_dispersion_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} must define get_config() returning an ml_collections.ConfigDict")
  cfg = module.get_config()
  _check_keys(cfg, default_config(), path)
  return cfg


def _flat(cfg: ConfigDict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k in cfg.keys():
    v = cfg[k]
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, ConfigDict) else {f"{prefix}{k}": v})
  return out


def _check_keys(cfg: ConfigDict, schema: ConfigDict, where: str) -> None:
  unknown = sorted(set(_flat(cfg)) - set(_flat(schema)))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r} in {where}; see dispersion_jax/config.py for the keys")


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
  """Set `key` (dotted) from its command-line text, typed by the schema."""
  schema = default_config()
  if key not in _flat(schema):
    raise ConfigError(f"unknown config key {key!r} (from --config.{key}); see dispersion_jax/config.py")
  *parents, leaf = key.split(".")
  node, ref_node = cfg, schema
  for p in parents:
    node, ref_node = node[p], ref_node[p]
  want = ref_node.get_ref(leaf).get_type() if isinstance(ref_node._fields[leaf], FieldReference) else \
      type(ref_node[leaf])
  node[leaf] = _parse(text, want, key)


def _parse(text: str, want: type, key: str):
  if text in ("None", "none", "null"):
    return None
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


def parse_args(argv: list[str]) -> tuple[ConfigDict, str]:
  """`--config FILE --workdir DIR [--config.KEY=VALUE ...]` -> (validated config, workdir)."""
  path, workdir, overrides = None, None, []
  args = list(argv)
  while args:
    a = args.pop(0)
    name, eq, val = a.partition("=")
    if name in ("--config", "--workdir"):
      if not eq:
        if not args:
          raise ConfigError(f"{name} needs a value")
        val = args.pop(0)
      path, workdir = (val, workdir) if name == "--config" else (path, val)
    elif name.startswith("--config."):
      if not eq:
        raise ConfigError(f"{a}: write overrides as --config.KEY=VALUE")
      overrides.append((name[len("--config."):], val))
    else:
      raise ConfigError(f"unknown argument {a!r}; usage: --config FILE --workdir DIR [--config.KEY=VALUE ...]")
  if path is None or workdir is None:
    raise ConfigError("usage: python -m dispersion_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]")
  cfg = load_config(path)
  for key, val in overrides:
    apply_override(cfg, key, val)
  return cfg, workdir


def validate(cfg: ConfigDict, num_devices: int | None = None) -> None:
  """Impossible combinations, caught before compiling."""
  def need(ok: bool, msg: str):
    if not ok:
      raise ConfigError(msg)
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every", "eval_batches"):
    need(cfg[key] >= 1, f"{key}={cfg[key]} must be >= 1")
  need(cfg.batch_size % cfg.grad_accum == 0,
       f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum}")
  need(cfg.model.preset in PRESETS, f"model.preset={cfg.model.preset!r}: use one of {', '.join(PRESETS)}")
  need(cfg.model.remat in REMAT_POLICIES, f"model.remat={cfg.model.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
  need(cfg.model.attention in ATTENTION_IMPLS,
       f"model.attention={cfg.model.attention!r}: use one of {', '.join(ATTENTION_IMPLS)}")
  need(cfg.dispersion.variant in VARIANTS, f"dispersion.variant={cfg.dispersion.variant!r}: use one of "
       f"{', '.join(VARIANTS)}")
  need(cfg.dispersion.loc in LOCS, f"dispersion.loc={cfg.dispersion.loc!r}: use one of {', '.join(LOCS)}")
  need(cfg.dispersion.tau_cos > 0 and cfg.dispersion.tau_l2 > 0, "dispersion.tau_cos and tau_l2 must be > 0")
  need(cfg.dispersion.max_tokens is None or cfg.dispersion.max_tokens >= 2,
       f"dispersion.max_tokens={cfg.dispersion.max_tokens} must be >= 2 or None (all tokens)")
  need(cfg.data.shards >= 0, f"data.shards={cfg.data.shards} must be >= 0 (0 = one per process)")
  need(cfg.dry_run_memory_budget_gb >= 0, f"dry_run_memory_budget_gb={cfg.dry_run_memory_budget_gb} must be >= 0")
  need(cfg.dispersion.ce_chunk is None or cfg.dispersion.ce_chunk >= 1,
       f"dispersion.ce_chunk={cfg.dispersion.ce_chunk} must be >= 1 or None (plain cross-entropy)")
  need(cfg.optimizer.lr > 0, f"optimizer.lr={cfg.optimizer.lr} must be > 0")
  need(cfg.optimizer.warmup >= 0, f"optimizer.warmup={cfg.optimizer.warmup} must be >= 0")
  need(cfg.init_from is None or os.path.isdir(cfg.init_from),
       f"init_from={cfg.init_from}: no such directory (a Hugging Face GPT-2 directory)")
  if num_devices is not None:
    from dispersion_jax.sharding import mesh_shape
    shape = mesh_shape(cfg, num_devices)
    dp = shape["data"] * shape["fsdp"]
    need((cfg.batch_size // cfg.grad_accum) % dp == 0,
         f"batch_size/grad_accum={cfg.batch_size // cfg.grad_accum} must be divisible by the data-parallel size "
         f"mesh.data*mesh.fsdp={dp}")


def compute_dtype(cfg: ConfigDict) -> str:
  if cfg.model.dtype != "auto":
    return cfg.model.dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_config(cfg: ConfigDict) -> GPTConfig:
  opts = dict(dropout=cfg.model.dropout, dtype=compute_dtype(cfg), param_dtype=cfg.model.param_dtype,
              remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, attention=cfg.model.attention)
  shape = {k: cfg.model[k] for k in _MODEL_SHAPE_KEYS if cfg.model[k] is not None}
  if cfg.init_from:
    from dispersion_jax.hf import config_from_json
    if shape:
      raise ConfigError(f"model.{next(iter(shape))} cannot be set with init_from: the shape comes from "
                        f"{cfg.init_from}/config.json")
    return config_from_json(cfg.init_from, **opts)
  base = dict(PRESETS[cfg.model.preset])
  base.update(shape)
  return GPTConfig(**base, **opts)


def dispersion_config(cfg: ConfigDict) -> DispersionConfig:
  return DispersionConfig(**cfg.dispersion.to_dict())
