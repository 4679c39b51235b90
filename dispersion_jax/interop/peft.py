"""Hugging Face PEFT LoRA adapter directories <-> our adapters (lora.py), offline and without torch.

A directory holds `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
target_modules, fan_in_fan_out, bias "none") and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<HF module name>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (e.g.
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, `base_model.model.model.layers.0.self_attn.q_proj...`).
Our A [in, r] and B [r, out] are their transposes in both families: PEFT's delta is (B_pt @ A_pt)^T for GPT-2's
Conv1D [in, out] weights (fan_in_fan_out true) and B_pt @ A_pt for Qwen3's nn.Linear [out, in] weights (false), and
our kernels are [in, out] in both, so W + A @ B * alpha / r is PEFT's merge_and_unload() in either case.
PEFT corrects a wrong fan_in_fan_out itself (with a warning), so a file's value is not needed here.
"""

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dispersion_jax.interop import hf
from dispersion_jax.models.lora import LoraSpec
from dispersion_jax.storage import transfer

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_UNSUPPORTED = (  # settings that change what the adapter computes beyond W + A @ B * alpha / r
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layers_to_transform",
    "layer_replication",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "trainable_token_indices",
)


def _per_layer(model_cfg, path: tuple[str, ...]) -> list[tuple[str, ...]]:
  return [(f"h_{i}",) + path[1:] for i in range(model_cfg.n_layer)] if path[0] == "h" else [path]


def _number(x: float) -> float | int:
  return int(x) if float(x).is_integer() else float(x)


def target_modules(model_cfg, modules: list[str]) -> list[str]:
  """PEFT's target_modules for these HF module names: the short names (c_attn, q_proj) when they select exactly
  these modules, else the full names (PEFT matches a name or a dotted suffix)."""
  all_names, _ = hf.block_kernel_names(model_cfg)
  short = {m.rsplit(".", 1)[-1] for m in modules}
  if {n for n in all_names.values() if n.rsplit(".", 1)[-1] in short} == set(modules):
    return sorted(short)
  return sorted(modules)


@transfer.writes_dir
def save_adapter(out_dir: str, model_cfg, spec: LoraSpec, adapters, base_model: str | None = None) -> None:
  """Write a PEFT adapter directory that `PeftModel.from_pretrained(<the HF model>, out_dir)` loads."""
  names, fan_in_fan_out = hf.block_kernel_names(model_cfg)
  tensors = {}
  for t in spec.targets:
    node = adapters
    for k in t:
      node = node[k]
    a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
    for i, p in enumerate(_per_layer(model_cfg, t)):
      a_ir, b_ro = (a[i], b[i]) if t[0] == "h" else (a, b)
      tensors[f"{_PREFIX}{names[p]}.lora_A.weight"] = np.ascontiguousarray(a_ir.T)
      tensors[f"{_PREFIX}{names[p]}.lora_B.weight"] = np.ascontiguousarray(b_ro.T)
  modules = sorted({k.removeprefix(_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": spec.rank,
      "lora_alpha": _number(spec.alpha),
      "lora_dropout": spec.dropout,
      "target_modules": target_modules(model_cfg, modules),
      "fan_in_fan_out": fan_in_fan_out,
      "bias": "none",
      "base_model_name_or_path": base_model,
      "inference_mode": True,
  }
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG), "w") as fh:
    json.dump(config, fh, indent=2)


@transfer.reads_dir
def read_config(path: str) -> dict:
  """adapter_config.json of a PEFT LoRA directory, checked for what we support (ValueError, one line)."""
  f = os.path.join(path, CONFIG)
  if not os.path.isfile(f):
    raise ValueError(f"{f} not found: lora.init_from must be a PEFT adapter directory (adapter_config.json)")
  with open(f) as fh:
    c = json.load(fh)
  if c.get("peft_type") != "LORA":
    raise ValueError(f"{f}: peft_type={c.get('peft_type')!r}, only LORA adapters are supported")
  if c.get("bias", "none") != "none":
    raise ValueError(f"{f}: bias={c['bias']!r}, only bias 'none' is supported")
  bad = next((k for k in _UNSUPPORTED if c.get(k)), None)
  if bad:
    raise ValueError(f"{f}: {bad}={c[bad]!r} is not supported (plain LoRA only)")
  if not isinstance(c.get("r"), int) or c["r"] < 1 or not c.get("lora_alpha"):
    raise ValueError(f"{f}: needs an integer r >= 1 and a lora_alpha")
  return c


@transfer.reads_dir
def load_adapter(path: str, model_cfg) -> tuple[LoraSpec, dict]:
  """(spec, adapters) of a PEFT LoRA directory for `model_cfg` (scanned or not), adapters in float32."""
  c = read_config(path)
  f = os.path.join(path, WEIGHTS)
  if not os.path.isfile(f):
    raise ValueError(f"{f} not found: the adapter directory lacks its weights")
  names, _ = hf.block_kernel_names(model_cfg)
  by_name = {n: p for p, n in names.items()}
  per_layer: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  with safe_open(f, framework="numpy") as fh:
    for key in fh.keys():
      module, _, which = key.removeprefix(_PREFIX).rpartition(".lora_")
      if not key.startswith(_PREFIX) or which not in ("A.weight", "B.weight") or module not in by_name:
        raise ValueError(f"{f}: tensor {key!r} is not a LoRA weight of a dense layer of this model (another model?)")
      per_layer.setdefault(by_name[module], {})[which[0].lower()] = fh.get_tensor(key).astype(np.float32).T
  r = c["r"]
  for p, ab in per_layer.items():
    shape = np.shape(ab.get("a")), np.shape(ab.get("b"))
    if len(ab) != 2 or shape[0][1] != r or shape[1][0] != r:
      raise ValueError(f"{f}: {names[p]} needs lora_A [r={r}, in] and lora_B [out, r={r}], has {shape}")
  return _spec_and_tree(model_cfg, c, per_layer, f)


def _spec_and_tree(model_cfg, c: dict, per_layer: dict, where: str) -> tuple[LoraSpec, dict]:
  flat = {}
  if model_cfg.scan_layers:
    for sub in sorted({p[1:] for p in per_layer}):
      layers = [per_layer.get((f"h_{i}",) + sub) for i in range(model_cfg.n_layer)]
      if any(ab is None for ab in layers):
        raise ValueError(
            f"{where}: {'/'.join(sub)} has adapters on some layers only; load it with model.scan_layers=False"
        )
      flat[("h",) + sub] = {k: np.stack([ab[k] for ab in layers]) for k in ("a", "b")}
  else:
    flat = per_layer
  tree: dict = {}
  for p, ab in flat.items():
    node = tree
    for k in p:
      node = node.setdefault(k, {})
    node.update(ab)
  spec = LoraSpec(c["r"], float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0), tuple(sorted(flat)))
  return spec, tree
