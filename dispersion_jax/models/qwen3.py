"""A flax.linen Qwen3 (dense), computed exactly as Hugging Face's `Qwen3ForCausalLM`, sowing every hidden state.

Shapes: B batch, L length, D width (n_embd), H query heads, G kv heads (H % G == 0), K head_dim (independent of
D: H * K != D in Qwen3-0.6B), F MLP width (n_inner), V vocabulary.
Per block (HF `Qwen3DecoderLayer`): x += o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)) on input_layernorm(x);
x += down(silu(gate(m)) * up(m)) on m = post_attention_layernorm(x) (a pre-MLP norm, despite its name).
Names mirror HF's (`embed_tokens`, `self_attn/q_proj`, `mlp/gate_proj`, `norm`, `lm_head`) so conversion is
mechanical; blocks are `h_{i}` (scanned: `h`) as in GPT-2, which `models.hidden_states` relies on. Dense kernels are
[in, out] (HF's nn.Linear weights transposed).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dispersion_jax.models import kv_cache
from dispersion_jax.models import layer_term as layer_term_lib
from dispersion_jax.models.layer_term import LayerTerm
from dispersion_jax.models.attention import ATTENTION_IMPLS, attention
from dispersion_jax.models.lora_dense import LoraDense
from dispersion_jax.models.neftune import add_embedding_noise
from dispersion_jax.models.remat import REMAT_POLICIES

_SHAPES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "head_dim", "n_inner")
_QWEN3 = dict(vocab_size=151936, n_positions=40960, head_dim=128)
_TITAN = dict(vocab_size=151936, n_positions=4096, n_layer=28, head_dim=128, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    # Hugging Face Qwen/Qwen3-* (config.json values; 8B is the first untied size).
    "qwen3-0.6b": dict(_QWEN3, n_embd=1024, n_layer=28, n_head=16, n_kv_head=8, n_inner=3072),
    "qwen3-1.7b": dict(_QWEN3, n_embd=2048, n_layer=28, n_head=16, n_kv_head=8, n_inner=6144),
    "qwen3-4b": dict(_QWEN3, n_embd=2560, n_layer=36, n_head=32, n_kv_head=8, n_inner=9728),
    "qwen3-8b": dict(_QWEN3, n_embd=4096, n_layer=36, n_head=32, n_kv_head=8, n_inner=12288, tie_embeddings=False),
    # The authors' TorchTitan fork: plain MHA, F = 3 D; untied, since the fork's tying is lost after FSDP wrapping.
    "qwen3-width_256": dict(_TITAN, n_embd=256, n_head=2, n_kv_head=2, n_inner=768),
    "qwen3-width_512": dict(_TITAN, n_embd=512, n_head=4, n_kv_head=4, n_inner=1536),
    "qwen3-width_768": dict(_TITAN, n_embd=768, n_head=6, n_kv_head=6, n_inner=2304),
    # CPU sizes. `tiny` has GPT-2's vocabulary: it trains on the offline GPT-2 BPE (the Qwen tokenizer needs an HF
    # tokenizer directory, and its 151,936-row embedding alone would be 39M parameters at this width).
    "tiny": dict(
        vocab_size=50257, n_positions=256, n_embd=256, n_layer=4, n_head=4, n_kv_head=2, head_dim=64, n_inner=768
    ),
    "test": dict(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, n_inner=64
    ),  # H * K = 64 != D = 32 and GQA, like the real sizes
}
_ACT = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  vocab_size: int = 151936
  n_positions: int = 40960  # max_position_embeddings; RoPE itself has no length limit
  n_embd: int = 1024  # hidden_size D
  n_layer: int = 28
  n_head: int = 16  # query heads H
  n_kv_head: int = 8  # key/value heads G; query head h reads kv head h // (H / G)
  head_dim: int = 128  # K, independent of n_embd / n_head
  n_inner: int = 3072  # intermediate_size F
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True  # logits = h @ embed_tokens^T; False: a separate lm_head
  dropout: float = 0.0  # Qwen3 has no dropout; kept so shared code can read cfg.dropout
  dtype: str = "float32"  # compute dtype; logits, softmax and RMSNorm statistics stay >= float32
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | minimal | dots (remat.py: what each saves)
  scan_layers: bool = False  # nn.scan over blocks: one compiled block, params stacked on `layers`
  attention: str = "auto"  # auto (cuDNN on GPU, splash on TPU, in bf16/fp16; else xla) | xla | cudnn | splash
  document_mask: bool = False  # attend within the packed row's own document only (segment ids, attention.py)
  lora_dropout: float = 0.0  # dropout on LoRA adapter inputs (lora.py), training steps only

  def __post_init__(self):
    for f in _SHAPES:
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"{f}={getattr(self, f)!r} must be a positive integer")
    if self.n_head % self.n_kv_head:
      raise ValueError(
          f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (grouped-query "
          "attention); change n_kv_head"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs of dimensions)")
    if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
      raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be positive")
    if self.dropout != 0.0:
      raise ValueError(
          f"dropout={self.dropout}: Qwen3 has no dropout (attention_dropout is 0 in every " "checkpoint); set dropout=0"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION_IMPLS)}")

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "Qwen3Config":
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  @property
  def mlp_dim(self) -> int:
    return self.n_inner


def _dense(features: int, names: tuple[str, str], cfg: Qwen3Config, name: str, **kw) -> nn.Dense:
  # HF's _init_weights: every Linear N(0, initializer_range=0.02); Qwen3 projections have no biases.
  return LoraDense(
      features,
      lora_dropout=cfg.lora_dropout,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
      **kw,
  )


class RMSNorm(nn.Module):
  """HF Qwen3RMSNorm: statistics in float32 or wider, cast back to the input dtype, THEN times the weight."""

  eps: float
  axis_name: str | None
  param_dtype: str
  dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
    )
    acc = jnp.promote_types(x.dtype, jnp.float32)  # HF always uses float32; float64 parity tests keep float64
    x_acc = x.astype(acc)
    y = x_acc * jax.lax.rsqrt(jnp.mean(x_acc * x_acc, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(x.dtype)


def _rms_norm(cfg: Qwen3Config, name: str, axis_name: str | None = "embed") -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, axis_name, cfg.param_dtype, cfg.dtype, name=name)


def rope_tables(positions_BxL, head_dim: int, theta: float, dtype):
  """cos, sin [B, L, K] of HF's default RoPE: angles in float32 (or wider), then cast to the compute dtype."""
  acc = jnp.promote_types(dtype, jnp.float32)
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=acc) / head_dim)
  ang_BxLxK2 = positions_BxL.astype(acc)[..., None] * inv_freq_K2
  ang_BxLxK = jnp.concatenate([ang_BxLxK2, ang_BxLxK2], axis=-1)  # dims i and i + K/2 share a frequency
  return jnp.cos(ang_BxLxK).astype(dtype), jnp.sin(ang_BxLxK).astype(dtype)


def apply_rope(x_BxLxNxK, cos_BxLxK, sin_BxLxK):
  """Rotate-half (NeoX) convention, as HF: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
  x1, x2 = jnp.split(x_BxLxNxK, 2, axis=-1)
  rot_BxLxNxK = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxLxNxK * cos_BxLxK[:, :, None, :] + rot_BxLxNxK * sin_BxLxK[:, :, None, :]


class Attention(nn.Module):
  cfg: Qwen3Config

  @nn.compact
  def __call__(self, x_BxLxD, cos_BxLxK, sin_BxLxK, segment_ids_BxL=None, positions_BxL=None):
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    H, G, K = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q_BxLxHxK = _dense(H * K, ("embed", "heads"), cfg, "q_proj")(x_BxLxD).reshape(B, L, H, K)
    k_BxLxGxK = _dense(G * K, ("embed", "kv_heads"), cfg, "k_proj")(x_BxLxD).reshape(B, L, G, K)
    v_BxLxGxK = _dense(G * K, ("embed", "kv_heads"), cfg, "v_proj")(x_BxLxD).reshape(B, L, G, K)
    # q/k norms over K, one weight shared by all heads, BEFORE the rotation (v is not normalised).
    q_BxLxHxK = apply_rope(_rms_norm(cfg, "q_norm", None)(q_BxLxHxK), cos_BxLxK, sin_BxLxK)
    k_BxLxGxK = apply_rope(_rms_norm(cfg, "k_norm", None)(k_BxLxGxK), cos_BxLxK, sin_BxLxK)
    cached = kv_cache.update(self, k_BxLxGxK, v_BxLxGxK, positions_BxL)  # None unless decoding with a KV cache
    if cached is None:
      o_BxLxHxK = attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, cfg.attention, segment_ids_BxL)
    else:
      o_BxLxHxK = attention(q_BxLxHxK, cached[0], cached[1], "xla", mask_BxLxS=cached[2])
    return _dense(D, ("heads", "embed"), cfg, "o_proj")(o_BxLxHxK.reshape(B, L, H * K))


class MLP(nn.Module):
  cfg: Qwen3Config

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    gate_BxLxF = _dense(cfg.n_inner, ("embed", "mlp"), cfg, "gate_proj")(x_BxLxD)
    up_BxLxF = _dense(cfg.n_inner, ("embed", "mlp"), cfg, "up_proj")(x_BxLxD)
    return _dense(x_BxLxD.shape[-1], ("mlp", "embed"), cfg, "down_proj")(nn.silu(gate_BxLxF) * up_BxLxF)


class Block(nn.Module):
  cfg: Qwen3Config
  term: LayerTerm | None = None  # a scalar of the block's output, computed inside the loop (layer_term.py)
  layer: int | None = None  # the hidden-state index of an unrolled block (static: remat would trace a call arg)

  @nn.compact
  def __call__(
      self, x_BxLxD, cos_BxLxK, sin_BxLxK, segment_ids_BxL=None, positions_BxL=None, term_inputs=None, index=None
  ):
    # nn.scan's (carry, *xs) -> (carry, y): the residual stream is the carry, the RoPE tables, segment ids and the
    # term's inputs are broadcast, the hidden-state index (1..n) is scanned (positions_BxL, for the KV cache, only
    # reaches unrolled blocks).
    cfg = self.cfg
    x_BxLxD = x_BxLxD + Attention(cfg, name="self_attn")(
        _rms_norm(cfg, "input_layernorm")(x_BxLxD), cos_BxLxK, sin_BxLxK, segment_ids_BxL, positions_BxL
    )
    x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(_rms_norm(cfg, "post_attention_layernorm")(x_BxLxD))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACT)
    self.sow("intermediates", "hidden", x_BxLxD)
    layer_term_lib.sow(self, self.term, x_BxLxD, self.layer if index is None else index, term_inputs)
    return x_BxLxD, None


class Qwen3(nn.Module):
  cfg: Qwen3Config

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
    del deterministic  # no dropout in Qwen3; the argument keeps the family interface
    cfg = self.cfg
    segment_ids_BxL = segment_ids_BxL if cfg.document_mask else None
    B, L = input_ids_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.n_embd,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="embed_tokens",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    x_BxLxD = embed(input_ids_BxL)  # no scaling, no position embedding
    if embed_noise_alpha:  # NEFTune-style noise (neftune.py): the whole embedding output
      x_BxLxD = add_embedding_noise(x_BxLxD, embed_noise_alpha, self.make_rng("noise"))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACT)
    self.sow("intermediates", "embed", x_BxLxD)
    cos_BxLxK, sin_BxLxK = rope_tables(positions_BxL, cfg.head_dim, cfg.rope_theta, cfg.dtype)  # once, not per block

    term, term_args = layer_term_lib.split(layer_term, cfg.n_layer, cfg.scan_layers)
    block = Block
    if cfg.remat != "none":
      # Under nn.scan the loop already keeps XLA from merging the recomputation into the forward pass (see gpt2.py).
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          block,
          variable_axes={"params": 0, "intermediates": 0, "lora": 0},
          split_rngs={"params": True, "lora": True},
          in_axes=(nn.broadcast,) * 5 + (0,),
          length=cfg.n_layer,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      h = stack(cfg, term, name="h")
      x_BxLxD, _ = h(x_BxLxD, cos_BxLxK, sin_BxLxK, segment_ids_BxL, None, *term_args)
    else:
      for i in range(cfg.n_layer):
        h = block(cfg, term, i + 1, name=f"h_{i}")
        x_BxLxD, _ = h(x_BxLxD, cos_BxLxK, sin_BxLxK, segment_ids_BxL, positions_BxL, term_args[0])

    x_BxLxD = _rms_norm(cfg, "norm")(x_BxLxD)
    self.sow("intermediates", "final", x_BxLxD)
    # Logits accumulate in float32 (or wider) whatever the compute dtype.
    acc = jnp.promote_types(cfg.dtype, jnp.float32)
    if cfg.tie_embeddings:
      return jnp.einsum(
          "bld,vd->blv", x_BxLxD.astype(cfg.dtype), embed.embedding.astype(cfg.dtype), preferred_element_type=acc
      )
    head = _dense(
        cfg.vocab_size,
        ("embed", "vocab"),
        cfg,
        "lm_head",
        dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=acc),
    )
    return head(x_BxLxD)


def lm_head(params: dict, cfg: Qwen3Config) -> jax.Array:
  """The output head as [V, D] in the compute dtype: the token embedding (tied) or lm_head's [D, V] kernel, .T."""
  if cfg.tie_embeddings:
    return params["embed_tokens"]["embedding"].astype(cfg.dtype)
  return params["lm_head"]["kernel"].T.astype(cfg.dtype)


EMBED_PATH = ("embed_tokens", "embedding")  # the input token embedding [V, D] (active forgetting re-draws it)
NEFTUNE_ALPHA = 5.0  # the authors' Qwen3 default
LORA_TARGETS = r"/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"  # attention + MLP (lora.py)


def lookup_params(cfg: Qwen3Config) -> int:
  """Parameters that do no matmul work per token, left out of FLOP counts: Qwen3 has no position table (RoPE), but
  an untied input embedding is a lookup (the head, tied or not, is counted once)."""
  return 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd


def attention_width(cfg: Qwen3Config) -> int:
  """The width that attention scores and values run at: H * K, not n_embd (they differ in Qwen3-0.6B and 4B)."""
  return cfg.n_head * cfg.head_dim


Config, Model = Qwen3Config, Qwen3  # the family interface (models/__init__.py)
