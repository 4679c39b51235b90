"""Model families behind one interface: a flax.linen module per family that sows its hidden states the same way.

Every family module (gpt2.py, qwen3.py) defines a frozen config dataclass with the shared fields `vocab_size`,
`n_positions`, `n_embd`, `n_layer`, `dtype`, `param_dtype`, `remat`, `scan_layers`, `attention`, and `preset()`;
a module `__call__(input_ids_BxL, positions_BxL=None, deterministic=True, embed_noise_alpha=0.0, segment_ids_BxL=None,
layer_term=None) -> logits_BxLxV` (float32 or wider; embed_noise_alpha > 0 adds neftune.add_embedding_noise to the
embedding output) that sows `intermediates/embed` (embedding output), `h_{i}/hidden` or scanned `h/hidden` (raw block
outputs), `intermediates/final` (the last block after the final norm) and, with a `layer_term` (layer_term.py), its
per-block values as `h_{i}/term` or `h/term`; `lm_head(params, cfg) -> [V, D]` in compute dtype;
`EMBED_PATH` (the input embedding in the params tree); `NEFTUNE_ALPHA` (the authors' default noise); `LORA_TARGETS`
(the default LoRA target regex, lora.py; dense layers are models/lora_dense.py's, so a `lora` variable collection
adds adapters and the config's `lora_dropout` their input dropout); `lookup_params(cfg)` and `attention_width(cfg)` (for
`flops_per_token`); and the aliases
`Config` and `Model` for its config class and module class.
Shared code goes through the functions here, never through `if family == ...`.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from dispersion_jax.models import gpt2, qwen3
from dispersion_jax.models.gpt2 import GPT, GPTConfig
from dispersion_jax.models.qwen3 import Qwen3, Qwen3Config

FAMILIES: dict[str, types.ModuleType] = {"gpt2": gpt2, "qwen3": qwen3}  # config.json's model_type -> family
_BY_CONFIG = {f.Config: f for f in FAMILIES.values()}
ModelConfig = GPTConfig | Qwen3Config


def family(cfg) -> types.ModuleType:
  """The family module (gpt2, qwen3) of a model config."""
  try:
    return _BY_CONFIG[type(cfg)]
  except KeyError:
    raise TypeError(
        f"{type(cfg).__name__} is not a model config; use one of " f"{', '.join(c.__name__ for c in _BY_CONFIG)}"
    ) from None


def build_model(cfg) -> nn.Module:
  """The Flax module of a model config (GPTConfig -> GPT, Qwen3Config -> Qwen3)."""
  return family(cfg).Model(cfg)


def hidden_states(variables: dict, final_norm: bool = True) -> tuple[jax.Array, ...]:
  """Sown states in Hugging Face `output_hidden_states` order: embedding output, blocks 1..n-1, then the last block
  after the final norm (final_norm=True, HF's convention) or its raw output (False, TorchTitan's)."""
  inter = variables["intermediates"]
  # sow appends to a tuple (one entry per call); every module is called once per apply, hence the [0]s.
  if "h" in inter:  # scanned: one array stacked on the layer axis
    blocks = list(inter["h"]["hidden"][0])
  else:
    n = sum(1 for k in inter if k.startswith("h_"))
    blocks = [inter[f"h_{i}"]["hidden"][0] for i in range(n)]
  last = inter["final"][0] if final_norm else blocks[-1]
  return (inter["embed"][0], *blocks[:-1], last)


def final_state(variables: dict) -> jax.Array:
  """The last block's output after the final norm (what the output head reads)."""
  return variables["intermediates"]["final"][0]


def lm_head(params: dict, cfg) -> jax.Array:
  """The output head as [V, D] in the compute dtype (the tied embedding or an untied head)."""
  return family(cfg).lm_head(params, cfg)


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), the one convention bench, the dry run and the training log's
  MFU use: 6 x (parameters - position table) + 6 x layers x seq_len x attention width (causal attention scores
  and values, halved), the convention of the measured H100 anchors (shared/docs/performance-notes.md). The
  dispersion term's own FLOPs are not counted: its cost shows as lost tokens/s."""
  f = family(cfg)
  weights = count_params(param_shapes(cfg)) - f.lookup_params(cfg)
  return 6.0 * weights + 6.0 * cfg.n_layer * seq_len * f.attention_width(cfg)


def _init(cfg, rng: jax.Array) -> dict:
  return build_model(cfg).init(rng, jnp.zeros((1, min(8, cfg.n_positions)), jnp.int32))


def init_params(cfg, rng: jax.Array) -> dict:
  """Plain (unboxed) parameter tree."""
  return nn.meta.unbox(_init(cfg, rng)["params"])


def param_shapes(cfg) -> dict:
  """The parameter tree as jax.ShapeDtypeStruct, without computing anything."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_logical_axes(cfg) -> dict:
  """Per-parameter PartitionSpec of logical axis names, e.g. P('layers', 'embed', 'mlp'); no compute."""
  return nn.get_partition_spec(jax.eval_shape(lambda: _init(cfg, jax.random.PRNGKey(0))))["params"]


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


__all__ = [
    "FAMILIES",
    "GPT",
    "GPTConfig",
    "ModelConfig",
    "Qwen3",
    "Qwen3Config",
    "build_model",
    "count_params",
    "family",
    "final_state",
    "flops_per_token",
    "hidden_states",
    "init_params",
    "lm_head",
    "param_logical_axes",
    "param_shapes",
]
