"""A flax.linen GPT-2 that sows every hidden state (Hugging Face `output_hidden_states` order).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `mlp`, `layers`) that `sharding.py` maps onto the
mesh. Dense kernels are [in, out], the layout of Hugging Face's Conv1D weights, so conversion is a rename.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dispersion_jax.models import kv_cache
from dispersion_jax.models.attention import ATTENTION_IMPLS, attention
from dispersion_jax.models import layer_term as layer_term_lib
from dispersion_jax.models.layer_term import LayerTerm
from dispersion_jax.models.lora_dense import LoraDense
from dispersion_jax.models.neftune import add_embedding_noise
from dispersion_jax.models.remat import REMAT_POLICIES

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),  # 124M
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),  # 355M
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),  # 774M
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),  # 1.5B
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, n_positions=256),
    "test": dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=128),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # MLP width; None = 4 * n_embd
  layer_norm_epsilon: float = 1e-5
  dropout: float = 0.0  # embedding and residual dropout (GPT-2's embd_pdrop / resid_pdrop)
  dtype: str = "float32"  # compute dtype; logits and softmax stay float32
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | minimal | dots (remat.py: what each saves)
  scan_layers: bool = False  # nn.scan over blocks: one compiled block, params stacked on `layers`
  attention: str = "auto"  # auto (cuDNN on GPU, splash on TPU, in bf16/fp16; else xla) | xla | cudnn | splash
  document_mask: bool = False  # attend within the packed row's own document only (segment ids, attention.py)
  lora_dropout: float = 0.0  # dropout on LoRA adapter inputs (lora.py), training steps only

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION_IMPLS)}")

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  @property
  def mlp_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


def _dense(features: int, names: tuple[str, str], std: float, cfg: GPTConfig, name: str) -> nn.Dense:
  return LoraDense(
      features,
      lora_dropout=cfg.lora_dropout,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
  )


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2], the PyTorch formula (E[x^2] - mean^2 loses digits).
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_epsilon,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      use_fast_variance=False,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
  )


class Attention(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL=None, positions_BxL=None):
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    H = cfg.n_head
    qkv_BxLx3D = _dense(3 * D, ("embed", "heads"), 0.02, cfg, "c_attn")(x_BxLxD)
    q, k, v = (t.reshape(B, L, H, D // H) for t in jnp.split(qkv_BxLx3D, 3, axis=-1))
    cached = kv_cache.update(self, k, v, positions_BxL)  # None unless decoding with a KV cache
    if cached is None:
      att_BxLxHxK = attention(q, k, v, cfg.attention, segment_ids_BxL)
    else:
      att_BxLxHxK = attention(q, cached[0], cached[1], "xla", mask_BxLxS=cached[2])
    return _dense(D, ("heads", "embed"), _proj_std(cfg), cfg, "c_proj")(att_BxLxHxK.reshape(B, L, D))


class MLP(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    h_BxLxM = _dense(self.cfg.mlp_dim, ("embed", "mlp"), 0.02, self.cfg, "c_fc")(x_BxLxD)
    h_BxLxM = nn.gelu(h_BxLxM, approximate=True)  # GPT-2's gelu_new (tanh approximation)
    return _dense(x_BxLxD.shape[-1], ("mlp", "embed"), _proj_std(self.cfg), self.cfg, "c_proj")(h_BxLxM)


def _proj_std(cfg: GPTConfig) -> float:
  return 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections scaled by depth


class Block(nn.Module):
  cfg: GPTConfig
  deterministic: bool = True
  term: LayerTerm | None = None  # a scalar of the block's output, computed inside the loop (layer_term.py)
  layer: int | None = None  # the hidden-state index of an unrolled block (static: remat would trace a call arg)

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL=None, positions_BxL=None, term_inputs=None, index=None):
    # (carry, *xs) -> (carry, y) is nn.scan's contract: the residual stream is the carry, the segment ids and the
    # term's inputs are broadcast, the hidden-state index (1..n) is scanned (positions_BxL, for the KV cache, only
    # reaches unrolled blocks).
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    x_BxLxD = x_BxLxD + drop(Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x_BxLxD), segment_ids_BxL, positions_BxL))
    x_BxLxD = x_BxLxD + drop(MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxLxD)))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    self.sow("intermediates", "hidden", x_BxLxD)
    layer_term_lib.sow(self, self.term, x_BxLxD, self.layer if index is None else index, term_inputs)
    return x_BxLxD, None


class GPT(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(
      self,
      input_ids_BxL,
      positions_BxL=None,
      deterministic: bool = True,
      embed_noise_alpha: float = 0.0,
      segment_ids_BxL=None,
      layer_term: LayerTerm | None = None,
  ):
    cfg = self.cfg
    B, L = input_ids_BxL.shape
    segment_ids_BxL = segment_ids_BxL if cfg.document_mask else None
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    wte = nn.Embed(
        cfg.vocab_size,
        cfg.n_embd,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="wte",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    wpe = nn.Embed(
        cfg.n_positions,
        cfg.n_embd,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="wpe",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
    )
    x_BxLxD = wte(input_ids_BxL) + wpe(positions_BxL)
    if embed_noise_alpha:  # NEFTune-style noise (neftune.py); on wte's output or after wpe: the same sum
      x_BxLxD = add_embedding_noise(x_BxLxD, embed_noise_alpha, self.make_rng("noise"))
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
    self.sow("intermediates", "embed", x_BxLxD)

    term, term_args = layer_term_lib.split(layer_term, cfg.n_layer, cfg.scan_layers)
    block = Block
    if cfg.remat != "none":
      # Under nn.scan the loop already keeps XLA from merging the recomputation into the forward pass, so the
      # CSE barriers prevent_cse inserts would only cost speed (jax.checkpoint's documented advice).
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          block,
          variable_axes={"params": 0, "intermediates": 0, "lora": 0},
          split_rngs={"params": True, "dropout": True, "lora": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=cfg.n_layer,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BxLxD, _ = stack(cfg, deterministic, term, name="h")(x_BxLxD, segment_ids_BxL, None, *term_args)
    else:
      for i in range(cfg.n_layer):
        h = block(cfg, deterministic, term, i + 1, name=f"h_{i}")
        x_BxLxD, _ = h(x_BxLxD, segment_ids_BxL, positions_BxL, term_args[0])

    x_BxLxD = _layer_norm(cfg, "ln_f")(x_BxLxD)
    self.sow("intermediates", "final", x_BxLxD)
    # Tied LM head; logits accumulate in float32 (or wider) whatever the compute dtype.
    acc = jnp.promote_types(cfg.dtype, jnp.float32)
    return jnp.einsum(
        "bld,vd->blv", x_BxLxD.astype(cfg.dtype), wte.embedding.astype(cfg.dtype), preferred_element_type=acc
    )


def lm_head(params: dict, cfg: GPTConfig) -> jax.Array:
  """The output head as [V, D] in the compute dtype: GPT-2 ties it to the token embedding."""
  return params["wte"]["embedding"].astype(cfg.dtype)


EMBED_PATH = ("wte", "embedding")  # the input token embedding [V, D] (active forgetting re-draws it)
NEFTUNE_ALPHA = 1.0  # the authors' GPT-2 default
LORA_TARGETS = r"/(c_attn|c_proj|c_fc)/kernel$"  # the authors' PEFT target_modules (lora.py)


def lookup_params(cfg: GPTConfig) -> int:
  """Parameters that do no matmul work per token (the learned position table), left out of FLOP counts."""
  return cfg.n_positions * cfg.n_embd


def attention_width(cfg: GPTConfig) -> int:
  return cfg.n_embd


Config, Model = GPTConfig, GPT  # the family interface (models/__init__.py)
