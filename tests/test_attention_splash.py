"""Does the TPU attention (the Pallas splash kernel) compute what the XLA path computes, with and without document
masking, and does attention="auto" pick it when compiling for a TPU?

The kernel runs here in Pallas interpret mode (the same kernel on CPU); inputs are bf16, as on a TPU. The reference
is the XLA path on the same bf16 inputs in float32. A v5e-8 compile of a tiny Qwen3 step shows the Mosaic kernel
in the TPU executable.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dispersion_jax import config as config_lib
from dispersion_jax.compile import dry_run as dry_run_lib
from dispersion_jax.models import attention as attn
from dispersion_jax.models import build_model, init_params
from dispersion_jax.models.qwen3 import Qwen3Config
from dispersion_jax.parallel import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu absent")

B, L, H, G, K = 2, 128, 4, 2, 64  # grouped-query (2 query heads per kv head), one 128-tile of sequence
BF16 = dict(atol=2e-2, rtol=2e-2)  # bf16 has 8 bits of mantissa: ~4e-3 relative per rounding


def _qkv(seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((B, L, n, K)), jnp.bfloat16) for n in (H, G, G))


def _segments():
  """Three documents in row 0 (cut at 50 and 90), one in row 1: ids as the loader numbers them."""
  seg = np.ones((B, L), np.int32)
  seg[0, 50:] = 2
  seg[0, 90:] = 3
  return jnp.asarray(seg)


def _loss(impl, segment_ids):
  def f(q, k, v):
    o = attn.attention(q, k, v, impl, segment_ids)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)  # a fixed, non-uniform cotangent
    return jnp.sum(o.astype(jnp.float32) * w)

  return f


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-masked"])
def test_splash_equals_xla_forward_and_gradient_in_bf16(masked):
  q, k, v = _qkv()
  seg = _segments() if masked else None
  ref = attn.xla_attention(*(t.astype(jnp.float32) for t in (q, k, v)), seg)
  out = jax.jit(lambda q, k, v: attn.attention(q, k, v, "splash", seg))(q, k, v)
  assert out.dtype == jnp.bfloat16 and out.shape == (B, L, H, K)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, **BF16)
  g_ref = jax.grad(_loss("xla", seg), argnums=(0, 1, 2))(*(t.astype(jnp.float32) for t in (q, k, v)))
  g = jax.jit(jax.grad(_loss("splash", seg), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b) / scale, atol=2e-2, err_msg=name)


def test_document_mask_is_attention_within_each_document():
  """The XLA path (the reference splash is held to) with segment ids = plain causal attention run on each document
  alone; tokens of other documents change nothing."""
  q, k, v = (t.astype(jnp.float32) for t in _qkv(1))
  seg = _segments()
  out = attn.xla_attention(q, k, v, seg)
  for lo, hi in [(0, 50), (50, 90), (90, L)]:
    alone = attn.xla_attention(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi])
    np.testing.assert_allclose(out[:1, lo:hi], alone, atol=1e-5)
  np.testing.assert_allclose(out[1:], attn.xla_attention(q[1:], k[1:], v[1:]), atol=1e-6)  # one document: causal


def test_auto_picks_splash_when_compiling_for_a_tpu():
  with backend.compiling_for("tpu"):
    assert attn.resolve_attention("auto", jnp.bfloat16, 2048) == "splash"
    assert attn.resolve_attention("auto", jnp.bfloat16, 200) == "xla"  # splash tiles are multiples of 128
    assert attn.resolve_attention("auto", jnp.float32, 2048) == "xla"
  with backend.compiling_for("gpu"):
    assert attn.resolve_attention("auto", jnp.bfloat16, 2048) == "cudnn"
  assert attn.resolve_attention("auto", jnp.bfloat16, 2048) == "xla"  # this CPU
  short = tuple(t[:, :100] for t in _qkv())  # not a multiple of 128: splash cannot tile it, XLA runs it
  np.testing.assert_array_equal(attn.attention(*short, "splash"), attn.attention(*short, "xla"))


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_model_document_mask_is_a_config_key_off_by_default(family):
  """model.document_mask (default off) reaches the model: on, a token's logits ignore earlier documents."""
  cfg = config_lib.load(os.path.join(ROOT, "configs/gpt2_tiny.py"), [f"model.family={family}", "model.preset=test"])
  assert cfg.model.document_mask is False and config_lib.model_config(cfg).document_mask is False
  cfg.model.document_mask = True
  mc = config_lib.model_config(cfg)
  params = init_params(mc, jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (1, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 6 + [2] * 10], jnp.int32)
  masked = jax.jit(build_model(mc).apply)({"params": params}, ids, segment_ids_BxL=seg)
  second_alone = jax.jit(build_model(mc).apply)({"params": params}, ids[:, 6:], jnp.arange(6, 16)[None])
  np.testing.assert_allclose(masked[:, 6:], second_alone, atol=1e-4)
  plain = jax.jit(build_model(config_lib.model_config(_off(cfg))).apply)({"params": params}, ids, segment_ids_BxL=seg)
  assert not np.allclose(plain[:, 6:], second_alone, atol=1e-3)


def _off(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.model.document_mask = False
  return cfg


def test_qwen3_model_with_splash_equals_xla():
  mc = Qwen3Config.preset("test", n_positions=128, dtype="bfloat16", attention="splash", document_mask=True)
  params = init_params(mc, jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 128)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1, 2]], 64, axis=1).repeat(2, axis=0), jnp.int32)
  out = jax.jit(build_model(mc).apply)({"params": params}, ids, segment_ids_BxL=seg)
  ref = build_model(Qwen3Config.preset("test", n_positions=128, dtype="bfloat16", attention="xla", document_mask=True))
  np.testing.assert_allclose(out, jax.jit(ref.apply)({"params": params}, ids, segment_ids_BxL=seg), atol=5e-2)


@needs_tpu
def test_tiny_qwen3_step_with_splash_compiles_for_a_v5e_8():
  cfg = config_lib.load(
      os.path.join(ROOT, "configs/gpt2_tiny.py"),
      [
          "model.family=qwen3", "model.preset=test", "model.n_positions=256", "seq_len=256", "batch_size=8",
          "model.head_dim=128", "model.document_mask=True", "mesh.data=1", "mesh.fsdp=-1",
          "dispersion.coeff=0", "dry_run=True", "dry_run_target=v5e-8",
      ],
  )  # fmt: skip
  target = dry_run_lib.target_of(cfg)
  with backend.compiling_for("tpu"):
    assert attn.resolve_attention(config_lib.model_config(cfg).attention, jnp.bfloat16, cfg.seq_len) == "splash"
    compiled, _, _ = dry_run_lib.compile_train_step(cfg, dry_run_lib.make_mesh(cfg, target))
  assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, forward and backward
