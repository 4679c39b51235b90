"""Hugging Face GPT-2 directories (config.json + model.safetensors) <-> GPTConfig and flax params, offline."""
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from dispersion_jax.models import GPTConfig

_LEAF = {"scale": "weight", "kernel": "weight", "embedding": "weight", "bias": "bias"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; tied head
_PREFIX = "transformer."


def _unstacked(cfg: GPTConfig, params: dict) -> dict:
  """Per-layer view `h_{i}` of params, whether the model scans its blocks (stacked under `h`) or not."""
  if not cfg.scan_layers:
    return params
  out = {k: v for k, v in params.items() if k != "h"}
  for i in range(cfg.n_layer):
    out[f"h_{i}"] = _tree_map(lambda x, i=i: x[i], params["h"])
  return out


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _hf_name(path: tuple[str, ...]) -> str:
  parts = [p.replace("h_", "h.", 1) if p.startswith("h_") else p for p in path[:-1]]
  return _PREFIX + ".".join(parts + [_LEAF[path[-1]]])


def to_hf_state_dict(cfg: GPTConfig, params: dict) -> dict[str, np.ndarray]:
  """Hugging Face GPT2LMHeadModel names (`transformer.`-prefixed) and layouts of `params`."""
  params = _unbox(params)
  return {_hf_name(path): np.asarray(v) for path, v in _flatten(_unstacked(cfg, params)).items()}


def _unbox(params: dict) -> dict:
  import flax.linen as nn
  return nn.meta.unbox(params)


def config_from_hf(hf: dict, **overrides: Any) -> GPTConfig:
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"unsupported activation_function {act!r} in config.json (GPT-2 uses gelu_new)")
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise ValueError("config.json asks for a non-standard attention scaling; only GPT-2's 1/sqrt(d) is supported")
  return GPTConfig(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), **overrides)


def from_hf_state_dict(cfg: GPTConfig, state: dict[str, np.ndarray]) -> dict:
  """Flax params for `cfg` from a Hugging Face state dict (prefixed or original unprefixed names)."""
  state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}
  state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
  want = _expected_shapes(cfg)
  missing = sorted(set(want) - set(state))
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} GPT-2 tensors (e.g. {missing[0]}); is it a GPT-2 model?")
  params: dict = {}
  for name, shape in want.items():
    arr = np.asarray(state[name], dtype=cfg.param_dtype)
    if arr.shape != shape:
      raise ValueError(f"{name} has shape {arr.shape}, config.json implies {shape}: config and weights disagree")
    path = _flax_path(name)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  if cfg.scan_layers:
    layers = [params.pop(f"h_{i}") for i in range(cfg.n_layer)]
    params["h"] = _stack(layers)
  return params


def _stack(trees: list[dict]) -> dict:
  return {k: _stack([t[k] for t in trees]) if isinstance(trees[0][k], dict) else np.stack([t[k] for t in trees])
          for k in trees[0]}


def _flax_path(hf_name: str) -> tuple[str, ...]:
  parts = hf_name.split(".")
  if parts[0] == "h":
    parts = [f"h_{parts[1]}"] + parts[2:]
  module, leaf = parts[:-1], parts[-1]
  if leaf == "weight":
    leaf = {"wte": "embedding", "wpe": "embedding"}.get(module[-1], "scale" if module[-1].startswith("ln") else "kernel")
  return tuple(module + [leaf])


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
  D, M = cfg.n_embd, cfg.mlp_dim
  out = {"wte.weight": (cfg.vocab_size, D), "wpe.weight": (cfg.n_positions, D),
         "ln_f.weight": (D,), "ln_f.bias": (D,)}
  for i in range(cfg.n_layer):
    p = f"h.{i}."
    out.update({p + "ln_1.weight": (D,), p + "ln_1.bias": (D,), p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
                p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
                p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
                p + "mlp.c_fc.weight": (D, M), p + "mlp.c_fc.bias": (M,),
                p + "mlp.c_proj.weight": (M, D), p + "mlp.c_proj.bias": (D,)})
  return out


def _require(path: str, name: str) -> str:
  f = os.path.join(path, name)
  if not os.path.isfile(f):
    raise ValueError(f"{f} not found: init_from / --hf-model must be a Hugging Face GPT-2 directory "
                     "with config.json and model.safetensors")
  return f


def config_from_json(path: str, **overrides: Any) -> GPTConfig:
  with open(_require(path, "config.json")) as fh:
    return config_from_hf(json.load(fh), **overrides)


def load_gpt2(path: str, **overrides: Any) -> tuple[GPTConfig, dict]:
  """Read a Hugging Face GPT-2 directory. `overrides` set GPTConfig options (dtype, scan_layers, remat, ...)."""
  weights = _require(path, "model.safetensors")
  cfg = config_from_json(path, **overrides)
  return cfg, from_hf_state_dict(cfg, load_file(weights))


def save_gpt2(path: str, cfg: GPTConfig, params: dict) -> None:
  """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads (float32 weights)."""
  os.makedirs(path, exist_ok=True)
  state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_hf_state_dict(cfg, params).items()}
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  hf_cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, "dtype": "float32"}
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_cfg, fh, indent=2)
