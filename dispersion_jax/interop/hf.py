"""Hugging Face model directories (config.json + safetensors) <-> model configs and flax params, offline.

Families: `gpt2` (GPT2LMHeadModel) and `qwen3` (Qwen3ForCausalLM), chosen by config.json's `model_type`.
Names are mechanical: a flax path `h_3/self_attn/q_proj/kernel` is HF's `model.layers.3.self_attn.q_proj.weight`.
GPT-2's Conv1D weights are [in, out] like flax kernels; Qwen3's nn.Linear weights are [out, in], so its kernels are
transposed. The expected tensors and shapes come from the model itself (`models.param_shapes`, no compute).
Reads single-file and sharded (`model.safetensors.index.json`) checkpoints in any float dtype (bf16 included).
"""

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from dispersion_jax import models
from dispersion_jax.storage import paths, transfer
from dispersion_jax.models import GPTConfig, Qwen3Config

_LEAF = {"scale": "weight", "kernel": "weight", "embedding": "weight", "bias": "bias"}
_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> config


def _gpt2_config(hf: dict, **overrides: Any) -> GPTConfig:
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"unsupported activation_function {act!r} in config.json (GPT-2 uses gelu_new)")
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise ValueError("config.json asks for a non-standard attention scaling; only GPT-2's 1/sqrt(d) is supported")
  return GPTConfig(
      vocab_size=hf["vocab_size"],
      n_positions=hf["n_positions"],
      n_embd=hf["n_embd"],
      n_layer=hf["n_layer"],
      n_head=hf["n_head"],
      n_inner=hf.get("n_inner"),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
      **overrides,
  )


def _gpt2_to_hf(cfg: GPTConfig) -> dict:
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "activation_function": "gelu_new",
      "vocab_size": cfg.vocab_size,
      "n_positions": cfg.n_positions,
      "n_embd": cfg.n_embd,
      "n_layer": cfg.n_layer,
      "n_head": cfg.n_head,
      "n_inner": cfg.n_inner,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "resid_pdrop": cfg.dropout,
      "embd_pdrop": cfg.dropout,
      "attn_pdrop": 0.0,
      "initializer_range": 0.02,
      "scale_attn_weights": True,
      "tie_word_embeddings": True,
      "bos_token_id": 50256,
      "eos_token_id": 50256,
  }


def _rope_theta(hf: dict) -> float:
  """transformers 5.x writes rope_parameters = {rope_type, rope_theta}; 4.x a top-level rope_theta (+ rope_scaling).
  Neither present: HF's default_theta, 10000 (not Qwen3's 1e6)."""
  rope = hf.get("rope_parameters")
  if rope is None:
    rope = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
  if kind != "default" or extra:
    raise ValueError(
        f"config.json rope_type={kind!r} {extra or ''}: only the default RoPE (no scaling) is " "supported"
    )
  return float(rope["rope_theta"])


def _qwen3_config(hf: dict, **overrides: Any) -> Qwen3Config:
  # Missing keys take transformers' Qwen3Config defaults (NOT the 0.6B values: head_dim 128, untied, ...).
  get = lambda key, default: default if hf.get(key) is None else hf[key]
  if hf.get("use_sliding_window"):
    raise ValueError("config.json use_sliding_window=true: sliding-window attention is not supported")
  bad = sorted({t for t in get("layer_types", []) if t != "full_attention"})
  if bad:
    raise ValueError(f"config.json layer_types has {bad[0]!r}: only full_attention layers are supported")
  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: Qwen3 here supports only silu")
  if get("attention_bias", False):
    raise ValueError("config.json attention_bias=true: q/k/v/o projection biases are not supported")
  if get("attention_dropout", 0.0):
    raise ValueError(f"config.json attention_dropout={hf['attention_dropout']}: only 0 is supported")
  heads = get("num_attention_heads", 32)
  return Qwen3Config(
      vocab_size=get("vocab_size", 151936),
      n_positions=get("max_position_embeddings", 32768),
      n_embd=get("hidden_size", 4096),
      n_layer=get("num_hidden_layers", 32),
      n_head=heads,
      n_kv_head=get("num_key_value_heads", heads),
      head_dim=get("head_dim", 128),
      n_inner=get("intermediate_size", 22016),
      rope_theta=_rope_theta(hf),
      rms_norm_eps=get("rms_norm_eps", 1e-6),
      tie_embeddings=get("tie_word_embeddings", False),
      **overrides,
  )


def _qwen3_to_hf(cfg: Qwen3Config) -> dict:
  # Legacy rope keys: transformers 4.51-4.57 read them as is and 5.x converts them to rope_parameters.
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.n_embd,
      "intermediate_size": cfg.n_inner,
      "num_hidden_layers": cfg.n_layer,
      "num_attention_heads": cfg.n_head,
      "num_key_value_heads": cfg.n_kv_head,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.n_positions,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.n_layer,
      "initializer_range": 0.02,
      "bos_token_id": None,
      "eos_token_id": None,
  }


# ---------------------------------------------------------------------------------------------------------------
# Per-family naming


@dataclasses.dataclass(frozen=True)
class _Family:
  config_from_hf: Callable[..., Any]
  config_to_hf: Callable[[Any], dict]
  prefix: str  # of every name except `unprefixed` ones
  layers: str  # HF's name of the block list
  transpose: bool  # kernels are torch nn.Linear [out, in]
  unprefixed: tuple[str, ...]  # top-level modules outside the prefix
  ignored: Callable[[Any, str], bool]  # checkpoint entries that are not parameters of this config


_FAMILIES = {
    "gpt2": _Family(
        _gpt2_config,
        _gpt2_to_hf,
        "transformer.",
        "h",
        False,
        (),
        # causal-mask buffers of old checkpoints; the head is always tied to wte
        lambda cfg, k: k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")),
    ),
    "qwen3": _Family(
        _qwen3_config,
        _qwen3_to_hf,
        "model.",
        "layers",
        True,
        ("lm_head",),
        # old Qwen-family checkpoints keep RoPE buffers; a tied checkpoint may also carry the head
        # (HF then ties it to embed_tokens and ignores it)
        lambda cfg, k: k.endswith(".rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight"),
    ),
}


def _family_name(cfg) -> str:
  mod = models.family(cfg)
  return next(name for name, m in models.FAMILIES.items() if m is mod)


def _hf_name(fam: _Family, path: tuple[str, ...]) -> str:
  """('h_3', 'attn', 'c_attn', 'kernel') -> 'transformer.h.3.attn.c_attn.weight' (per-layer paths only)."""
  parts = [f"{fam.layers}.{p[2:]}" if p.startswith("h_") else p for p in path[:-1]]
  name = ".".join(parts + [_LEAF[path[-1]]])
  return name if path[0] in fam.unprefixed else fam.prefix + name


def _transposed(fam: _Family, path: tuple[str, ...]) -> bool:
  return fam.transpose and path[-1] == "kernel"


def _per_layer(cfg, flat: dict[tuple, Any]) -> dict[tuple, Any]:
  """Scanned leaves `h/...` (stacked on a leading layer axis) -> `h_{i}/...`; unrolled paths unchanged."""
  out = {}
  for path, v in flat.items():
    if path[0] == "h":
      out.update({(f"h_{i}",) + path[1:]: v[i] for i in range(cfg.n_layer)})
    else:
      out[path] = v
  return out


per_layer = _per_layer  # public name for the decoder (decode.unrolled)


def _expected(cfg) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Per-layer flax path -> abstract parameter, from the model (one scanned block traced, nothing computed)."""
  abstract = models.param_shapes(dataclasses.replace(cfg, scan_layers=True, remat="none"))
  out = {}
  for path, s in traverse_util.flatten_dict(abstract).items():
    if path[0] == "h":
      out.update({(f"h_{i}",) + path[1:]: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for i in range(cfg.n_layer)})
    else:
      out[path] = s
  return out


def block_kernel_names(cfg) -> tuple[dict[tuple[str, ...], str], bool]:
  """Per-layer flax module path of every dense kernel inside the blocks -> its Hugging Face module name, e.g.
  ('h_0', 'attn', 'c_attn') -> 'transformer.h.0.attn.c_attn' (the modules PEFT adapters attach to); and
  whether those modules are GPT-2's Conv1D (PEFT's fan_in_fan_out) as the second value."""
  fam = _FAMILIES[_family_name(cfg)]
  names = {p[:-1]: _hf_name(fam, p).removesuffix(".weight") for p in _expected(cfg) if p[-1] == "kernel"}
  return {p: n for p, n in names.items() if p[0].startswith("h_")}, not fam.transpose


# ---------------------------------------------------------------------------------------------------------------
# state dicts


def to_hf_state_dict(cfg, params: dict) -> dict[str, np.ndarray]:
  """Hugging Face names and layouts of `params` (or of gradients shaped like them), scanned or not."""
  import flax.linen as nn

  fam = _FAMILIES[_family_name(cfg)]
  flat = _per_layer(cfg, traverse_util.flatten_dict(nn.meta.unbox(params)))
  return {_hf_name(fam, p): np.asarray(v).T if _transposed(fam, p) else np.asarray(v) for p, v in flat.items()}


def from_hf_state_dict(cfg, state: dict[str, np.ndarray]) -> dict:
  """Flax params for `cfg` from a Hugging Face state dict (GPT-2 also in its original unprefixed names), cast to
  cfg.param_dtype. Missing, unexpected or mis-shaped tensors raise ValueError with one line."""
  name = _family_name(cfg)
  fam = _FAMILIES[name]
  # Accept names with and without the prefix (the original `gpt2` checkpoints have none).
  state = {
      k if k.startswith(fam.prefix) or k.split(".")[0] in fam.unprefixed else fam.prefix + k: v
      for k, v in state.items()
  }
  state = {k: v for k, v in state.items() if not fam.ignored(cfg, k)}
  want = {_hf_name(fam, p): (p, s) for p, s in _expected(cfg).items()}
  missing = sorted(set(want) - set(state))
  if missing:
    hint = "an untied config needs lm_head.weight" if missing == ["lm_head.weight"] else f"is it a {name} model?"
    raise ValueError(f"checkpoint lacks {len(missing)} {name} tensors (e.g. {missing[0]}); {hint}")
  extra = sorted(set(state) - set(want))
  if extra:
    raise ValueError(
        f"checkpoint has {len(extra)} tensors this {name} config does not use (e.g. {extra[0]}): "
        "config and weights disagree"
    )
  dtype = jnp.dtype(cfg.param_dtype)
  flat = {}
  for hf_name, (path, abstract) in want.items():
    arr, t = np.asarray(state[hf_name]), _transposed(fam, path)
    hf_shape = abstract.shape[::-1] if t else abstract.shape
    if arr.shape != hf_shape:
      raise ValueError(
          f"{hf_name} has shape {arr.shape}, config.json implies {hf_shape}: config and weights " "disagree"
      )
    flat[path] = np.ascontiguousarray(arr.T if t else arr, dtype=dtype)
  if cfg.scan_layers:  # stack h_0..h_{n-1} leaf by leaf on a leading `layers` axis
    for path in [p for p in flat if p[0] == "h_0"]:
      flat[("h",) + path[1:]] = np.stack([flat.pop((f"h_{i}",) + path[1:]) for i in range(cfg.n_layer)])
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------------
# directories


def _missing(path: str, what: str) -> ValueError:
  return ValueError(
      f"{paths.join(path, what)} not found: init_from / --hf-model must be a Hugging Face GPT-2 or "
      f"Qwen3 directory with config.json and model.safetensors (or {_INDEX})"
  )


def _read_config(path: str) -> dict:
  f = paths.path(path, what="init_from").joinpath("config.json")  # a local directory or a bucket prefix
  if not f.is_file():
    raise _missing(path, "config.json")
  return json.loads(f.read_text())


def config_from_hf(hf: dict, **overrides: Any):
  """The model config (GPTConfig, Qwen3Config) of a parsed config.json, by its model_type (default gpt2).
  `overrides` set runtime options (dtype, param_dtype, scan_layers, remat, attention, dropout)."""
  kind = hf.get("model_type", "gpt2")
  if kind not in _FAMILIES:
    raise ValueError(f"config.json model_type={kind!r} is not supported; use one of {', '.join(_FAMILIES)}")
  return _FAMILIES[kind].config_from_hf(hf, **overrides)


def config_from_json(path: str, **overrides: Any):
  """The model config of a Hugging Face directory (any supported family)."""
  return config_from_hf(_read_config(path), **overrides)


@transfer.reads_dir
def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of `path/model.safetensors` or of the shards listed in `path/model.safetensors.index.json`, in
  its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
  single, index = os.path.join(path, _WEIGHTS), os.path.join(path, _INDEX)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as fh:
      weight_map = json.load(fh)["weight_map"]
    files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise ValueError(f"{absent[0]} is listed in {index} but not found: incomplete download?")
  else:
    raise _missing(path, _WEIGHTS)
  state = {}
  for f in files:
    with safe_open(f, framework="numpy") as fh:
      state.update({k: fh.get_tensor(k) for k in fh.keys()})
  return state


@transfer.reads_dir
def load_pretrained(path: str, **overrides: Any) -> tuple[Any, dict]:
  """(config, params) of a Hugging Face GPT-2 or Qwen3 directory. `overrides` set runtime options (dtype,
  param_dtype, scan_layers, remat, attention, dropout); params are cast to param_dtype."""
  cfg = config_from_json(path, **overrides)
  return cfg, from_hf_state_dict(cfg, read_safetensors(path))


@transfer.writes_dir
def save_pretrained(path: str, cfg, params: dict, dtype: str = "float32") -> None:
  """Write config.json and model.safetensors that transformers' `AutoModelForCausalLM.from_pretrained` loads
  (GPT2LMHeadModel / Qwen3ForCausalLM); weights in `dtype` (float32, bfloat16, float16); no head when tied."""
  os.makedirs(path, exist_ok=True)
  fam = _FAMILIES[_family_name(cfg)]
  state = {k: np.ascontiguousarray(v, dtype=jnp.dtype(dtype)) for k, v in to_hf_state_dict(cfg, params).items()}
  save_file(state, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump({**fam.config_to_hf(cfg), "dtype": dtype, "torch_dtype": dtype}, fh, indent=2)


@transfer.reads_dir
def load_gpt2(path: str, **overrides: Any) -> tuple[GPTConfig, dict]:
  """load_pretrained for a GPT-2 directory only (the original entry point)."""
  kind = _read_config(path).get("model_type", "gpt2")
  if kind != "gpt2":
    raise ValueError(f"{path} holds a {kind!r} model, not GPT-2; use hf.load_pretrained")
  return load_pretrained(path, **overrides)


def save_gpt2(path: str, cfg: GPTConfig, params: dict) -> None:
  """save_pretrained for GPT-2 (float32 weights)."""
  save_pretrained(path, cfg, params)
