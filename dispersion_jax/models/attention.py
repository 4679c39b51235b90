"""Causal (grouped-query) self-attention for both families, by one of three implementations:

- `xla`: scores, mask and softmax as plain XLA ops (float32 or wider softmax; the reference);
- `cudnn`: cuDNN's fused flash attention (`jax.nn.dot_product_attention`, GPUs);
- `splash`: the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, the kernel
  MaxText uses): block-sparse flash attention that never builds the L x L scores. On a multi-device mesh a Mosaic
  kernel cannot be partitioned automatically, so it runs inside `shard_map` over the batch and head axes of the
  context mesh. Off TPU (CPU tests) it runs in Pallas interpret mode: same kernel, same numerics, slow.

`auto` picks cuDNN on GPUs and splash on TPUs (half precision), XLA elsewhere. Splash tiles the sequence in multiples
of 128; other lengths (a model's 8-token init, short evaluations) run the XLA path whatever the setting.

Document masking: `segment_ids_BxL` (the packed rows' document numbers, data/loader.py) restricts every query to
keys of its own document, on every implementation (the XLA mask, cuDNN's mask, splash's SegmentIds). None (the
default) is plain causal attention over the packed row.

Query head h reads kv head h // (H / G) (Hugging Face's repeat_kv); GPT-2 is the case G = H.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dispersion_jax.parallel import backend

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
SPLASH_BLOCK = 512  # splash's q / kv tile (MaxText's default sa_block_*), capped at the sequence length
_LANES = 128  # splash's tiles are multiples of the TPU lane width


def resolve_attention(impl: str, dtype, seq_len: int | None = None) -> str:
  """What attention="auto" runs: cuDNN flash attention on GPUs and the splash kernel on TPUs (half precision; splash
  also needs a sequence that is a multiple of 128), XLA elsewhere. The backend is the one compiled for (a dry-run
  target's, see backend.py)."""
  if impl != "auto":
    return impl
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  where = backend.current()
  if where == "gpu":
    return "cudnn"
  if where == "tpu" and (seq_len is None or seq_len % _LANES == 0):
    return "splash"
  return "xla"


def document_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B, L, L] bool: query i may see key j of the same document (segment id)."""
  return segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]


def attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, impl: str, segment_ids_BxL=None, mask_BxLxS=None):
  """Causal attention, scale K**-0.5. With a KV cache, keys/values are the cache's S slots and mask_BxLxS says which
  ones each query sees (XLA only). segment_ids_BxL: document masking (module docstring)."""
  impl = resolve_attention(impl, q_BxLxHxK.dtype, q_BxLxHxK.shape[1])
  if mask_BxLxS is not None and impl != "xla":
    raise ValueError(f"an explicit attention mask (the KV cache) runs on attention='xla', not {impl!r}")
  if impl == "cudnn":
    mask = None if segment_ids_BxL is None else document_mask(segment_ids_BxL)[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask, is_causal=True, implementation="cudnn"
    )
  if impl == "splash" and q_BxLxHxK.shape[1] % _LANES == 0:  # other lengths (init's 8 tokens) run XLA's path
    return splash_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL)
  if impl not in ("xla", "splash"):
    raise ValueError(f"attention={impl!r}: use one of {', '.join(ATTENTION_IMPLS)}")
  return xla_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL, mask_BxLxS)


def xla_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL=None, mask_BxLxS=None):
  """The reference: heads split into (G, R) so h = g * R + r; no repeated copy of k/v is built. Softmax in float32 or
  wider (jax.nn.dot_product_attention caps it at float32, which would break float64 parity tests)."""
  B, L, H, K = q_BxLxHxK.shape
  G = k_BxSxGxK.shape[2]
  acc = jnp.promote_types(q_BxLxHxK.dtype, jnp.float32)
  q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)
  s_BxGxRxLxS = jnp.einsum("blgrk,bmgk->bgrlm", q_BxLxGxRxK, k_BxSxGxK, preferred_element_type=acc) / math.sqrt(K)
  if mask_BxLxS is None:
    mask_BxLxS = jnp.tril(jnp.ones((L, L), bool))[None]
  if segment_ids_BxL is not None:
    mask_BxLxS = mask_BxLxS & document_mask(segment_ids_BxL)
  p_BxGxRxLxS = jax.nn.softmax(jnp.where(mask_BxLxS[:, None, None], s_BxGxRxLxS, jnp.finfo(acc).min), axis=-1)
  o_BxLxGxRxK = jnp.einsum("bgrlm,bmgk->blgrk", p_BxGxRxLxS.astype(v_BxSxGxK.dtype), v_BxSxGxK)
  return o_BxLxGxRxK.reshape(B, L, H, K)


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool):
  """Built per trace (its mask tables become arrays of the trace; a cached kernel would leak them)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415 - Pallas only when used

  b = min(SPLASH_BLOCK, seq_len)
  blocks = sa.BlockSizes(
      block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
      block_q_dq=b, block_kv_dq=b,
  )  # fmt: skip
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
  return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret: bool):
  """splash on one device's shard: the kernel takes [heads, L, K] per sequence; vmapped over the batch."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # noqa: PLC0415

  B, L, H, K = q_BxLxHxK.shape
  kernel = _splash_kernel(H, L, interpret)
  q_BxHxLxK = (q_BxLxHxK * (1.0 / math.sqrt(K))).astype(q_BxLxHxK.dtype).transpose(0, 2, 1, 3)
  k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
  if segment_ids_BxL is None:
    o_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
  else:
    seg = segment_ids_BxL.astype(jnp.int32)
    o_BxHxLxK = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, seg
    )
  return o_BxHxLxK.transpose(0, 2, 1, 3)


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=None):
  """The splash kernel over the context mesh: batch on (data, fsdp), heads on tensor, as the activation rules place
  them (parallel/sharding.py); no mesh (or one device) runs it directly."""
  interpret = backend.current() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  local = functools.partial(_splash_local, interpret=interpret)
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape) or None
  heads = "tensor" if "tensor" in mesh.shape else None
  qkv = P(batch, None, heads, None)
  if segment_ids_BxL is None:
    fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)
    return fn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
  fn = jax.shard_map(local, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False)
  return fn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
