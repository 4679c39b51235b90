"""The gradient-in-forward reformulation (impl="xla") and the Mosaic GPU kernel (impl="pallas") against the
previous plain-autodiff path (impl="reference", itself checked against the authors' float64 goldens)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dispersion_jax import VARIANTS, dispersion_loss
from dispersion_jax.losses import dispersion as disp
from dispersion_jax.losses import dispersion_fused as fused
from dispersion_jax.losses import dispersion_pallas as dpal

ON_GPU = jax.default_backend() == "gpu"


def _rand(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape)


def _masks(B, L):
  mask = np.ones((B, L), bool)
  mask[1, L - 7 :] = False
  mask[min(2, B - 1), 1:] = False  # a sequence with one token: no pair
  seg = ((np.arange(L) // 7) % 3 * 1000 - 5)[None].repeat(B, 0)  # runs of 7 tokens, ids -5, 995, 1995 cycling
  return mask, seg


def _value_and_grad(z, variant, impl, **kw):
  return jax.value_and_grad(lambda z: dispersion_loss(z, variant, impl=impl, **kw))(z)


def _assert_close(got, want, rtol_v=1e-12, rtol_g=1e-10):
  np.testing.assert_allclose(got[0], want[0], rtol=rtol_v, atol=1e-15)
  np.testing.assert_allclose(got[1], want[1], rtol=rtol_g, atol=1e-12 * float(np.abs(want[1]).max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_equals_reference_float64(x64, variant):
  """Masks, segments, an empty sequence, dense and blocked (last block padded), subsampling, heavy clamping."""
  z = _rand((3, 37, 6), seed=1) + 0.3
  mask, seg = _masks(3, 37)
  kw = dict(tau_l2=3.0, clamp_threshold=0.1)
  ref = _value_and_grad(z, variant, "reference", mask=mask, segment_ids=seg, block_size=None, **kw)
  _assert_close(_value_and_grad(z, variant, "xla", mask=mask, segment_ids=seg, block_size=None, **kw), ref)
  _assert_close(_value_and_grad(z, variant, "xla", mask=mask, segment_ids=seg, block_size=8, **kw), ref)
  if variant in ("decorrelation", "angular_spread"):  # no segments: decorrelation takes the Gram identity
    ref = _value_and_grad(z, variant, "reference", mask=mask, block_size=None, **kw)
    _assert_close(_value_and_grad(z, variant, "xla", mask=mask, block_size=8, **kw), ref)
  # Condensed states: with t = 0.25 most cosines lie beyond the clamp (the straight-through gradient).
  zc = _rand((1, 1, 6), seed=2) + 0.15 * _rand((2, 30, 6), seed=3)
  cos = np.einsum("blf,bmf->blm", *(zc / np.linalg.norm(zc, axis=-1, keepdims=True),) * 2)
  assert np.mean(cos > 0.75) > 0.5
  sub = dict(max_tokens=19, key=jax.random.PRNGKey(4), clamp_threshold=0.25)
  _assert_close(
      _value_and_grad(zc, variant, "xla", block_size=8, **sub),
      _value_and_grad(zc, variant, "reference", block_size=None, **sub),
  )


def test_auto_is_the_xla_reformulation_and_bad_impls_raise():
  assert disp.resolve_impl("auto", "angular_spread", backend="gpu") == "xla"
  assert disp.resolve_impl("auto", "angular_spread") == "xla"
  assert disp.resolve_impl("pallas", "l2_repel", backend="cpu") == "pallas"  # no kernel: runs the XLA path
  with pytest.raises(ValueError, match="unknown dispersion impl"):
    dispersion_loss(np.zeros((1, 4, 3), np.float32), impl="triton")
  if not ON_GPU:
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      dispersion_loss(np.zeros((1, 4, 3), np.float32), impl="pallas")


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_pair_gives_zero_and_half_precision_is_promoted(variant):
  z = jnp.asarray(_rand((2, 9, 8), seed=5), jnp.float32)
  v, g = _value_and_grad(z, variant, "xla", mask=np.zeros((2, 9), bool))
  assert float(v) == 0.0 and not np.any(np.asarray(g))
  zh = z.astype(jnp.bfloat16)
  v, g = _value_and_grad(zh, variant, "xla", block_size=4)
  v_ref, g_ref = _value_and_grad(zh, variant, "reference", block_size=None)
  assert v.dtype == jnp.float32 and g.dtype == jnp.bfloat16
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(g, np.float32),
      np.asarray(g_ref, np.float32),
      rtol=2e-2,
      atol=2e-2 * float(jnp.abs(g_ref.astype(jnp.float32)).max()),
  )


@pytest.mark.parametrize("variant", ["angular_spread", "l2_repel", "perplexity_entropy"])
def test_backward_holds_no_pairwise_residual(variant):
  """What value_and_grad keeps for the backward pass: [B, L, F]-sized arrays only, no [B, L, L] one."""
  B, L, F = 2, 64, 8
  z = jnp.asarray(_rand((B, L, F), seed=6), jnp.float32)

  def biggest_residual(impl, block_size):
    _, vjp_fn = jax.vjp(lambda z: dispersion_loss(z, variant, impl=impl, block_size=block_size), z)
    return max(leaf.size for leaf in jax.tree.leaves(vjp_fn))

  assert biggest_residual("reference", None) >= B * L * L  # what the old dense path keeps
  for block_size in (None, 16):
    assert biggest_residual("xla", block_size) <= B * L * F


def _temp_bytes(shape, variant, impl, block_size):
  fn = jax.jit(jax.value_and_grad(lambda z: dispersion_loss(z, variant, impl=impl, block_size=block_size)))
  return fn.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "variant, block_size, ratio",
    [
        ("angular_spread", None, 1.0),
        ("angular_spread", 128, 0.6),
        ("l2_repel", 128, 0.6),
        ("perplexity_entropy", None, 0.75),
    ],
)
def test_xla_needs_less_memory_than_reference(variant, block_size, ratio):
  """XLA's temp bytes of value+grad (compiled, not run) where L x L dominates."""
  shape = (2, 512, 32)
  assert _temp_bytes(shape, variant, "xla", block_size) <= ratio * _temp_bytes(shape, variant, "reference", block_size)


def test_vmap_and_batch_sharding_give_the_same_numbers():
  z = jnp.asarray(_rand((2, 8, 20, 6), seed=7), jnp.float32)
  mask, seg = _masks(8, 20)
  for variant in ("angular_spread", "perplexity_entropy"):
    f = jax.jit(
        jax.value_and_grad(
            functools.partial(lambda z, v: dispersion_loss(z, v, mask=mask, segment_ids=seg, block_size=8), v=variant)
        )
    )
    want = [f(z[i]) for i in range(2)]
    got = jax.vmap(f)(z)
    for i in range(2):
      np.testing.assert_allclose(got[0][i], want[i][0], rtol=1e-6)
      np.testing.assert_allclose(got[1][i], want[i][1], rtol=1e-5, atol=1e-7)
    if len(jax.devices()) >= 8:  # tests/conftest.py: 8 fake CPU devices
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
      zs = jax.device_put(z[0], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
      v, g = f(zs)
      assert g.sharding.is_equivalent_to(zs.sharding, 3)
      np.testing.assert_allclose(v, want[0][0], rtol=1e-6)
      np.testing.assert_allclose(g, want[0][1], rtol=1e-5, atol=1e-7)


def test_pair_codes_match_the_pair_mask():
  mask, seg = _masks(3, 23)
  code_r, code_c, partners = fused.pair_codes(jnp.asarray(mask), jnp.asarray(seg, jnp.int32))
  pair = (code_r[:, :, None] == code_c[:, None, :]) & ~np.eye(23, dtype=bool)
  want = mask[:, :, None] & mask[:, None, :] & (seg[:, :, None] == seg[:, None, :]) & ~np.eye(23, dtype=bool)
  np.testing.assert_array_equal(pair, want)
  np.testing.assert_array_equal(partners, want.sum(-1))


# ---- the Mosaic GPU kernel ------------------------------------------------------------------------------------


def test_acos_poly_accuracy():
  x = jnp.linspace(-0.99, 0.99, 200_001, dtype=jnp.float32)
  err = np.abs(np.asarray(dpal.acos_poly(x), np.float64) - np.arccos(np.asarray(x, np.float64)))
  assert err.max() < 1e-6  # 4.6e-7 measured on CPU (XLA: 2.6e-7); GPU rsqrt is approximate


def _kernel_reference(zb, code_r, code_c, variant, tau, t, margin):
  """What K1 must produce, in plain jnp from the same bf16 operands."""
  c = jnp.clip(jnp.einsum("blf,bmf->blm", zb, zb, preferred_element_type=jnp.float32), -1 + t, 1 - t)
  dist = jnp.arccos(c) / np.pi
  L = zb.shape[1]
  pair = (code_r[:, :, None] == code_c[:, None, :]) & ~jnp.eye(L, dtype=bool)
  v = jnp.exp((dpal._d_min(t) - dist) / tau) if variant == "angular_spread" else jnp.maximum(margin - dist, 0.0)
  v = jnp.where(pair, v, 0.0)
  return v * jax.lax.rsqrt(1 - c * c), (v if variant == "angular_spread" else v * v).sum(-1)


@pytest.mark.parametrize("variant", dpal.KERNEL_VARIANTS)
def test_kernel_in_gpu_interpret_mode_matches_jnp(variant):
  B, L, F = 2, 128, 64
  z = jnp.asarray(_rand((B, L, F), seed=8) + 0.2, jnp.float32)
  zb = (z / jnp.linalg.norm(z, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  mask, seg = _masks(B + 1, L)
  code_r, code_c, _ = fused.pair_codes(jnp.asarray(mask[1:]), jnp.asarray(seg[1:], jnp.int32))
  kw = dict(variant=variant, tau=0.5, t=0.1, margin=0.5)
  w, rs = jax.jit(functools.partial(dpal._gram_epilogue, store_w=True, interpret=True, **kw))(zb, code_r, code_c)
  w_ref, rs_ref = _kernel_reference(zb, code_r, code_c, **kw)
  assert rs.shape == (B, L // dpal.TILE_N, L)
  np.testing.assert_allclose(np.asarray(w, np.float32), w_ref, rtol=8e-3, atol=1e-6)  # W is stored in bf16
  np.testing.assert_allclose(rs.sum(1), rs_ref, rtol=2e-6, atol=1e-6 * float(rs_ref.max()))  # acos_poly: 5e-7
  _, rs_only = jax.jit(functools.partial(dpal._gram_epilogue, store_w=False, interpret=True, **kw))(zb, code_r, code_c)
  np.testing.assert_array_equal(rs_only, rs)


@pytest.mark.parametrize("variant, shape", [("angular_spread", (3, 100, 40)), ("orthogonalization", (2, 70, 72))])
def test_pallas_in_interpret_mode_equals_xla(variant, shape):
  """End to end through the custom_vjp, at shapes that are no multiple of the tile (L, F padded)."""
  z = jnp.asarray(_rand(shape, seed=9) + 0.3, jnp.float32)
  mask, seg = _masks(*shape[:2])
  kw = dict(mask=mask, segment_ids=seg, tau_cos=0.5, clamp_threshold=0.1)
  v, g = jax.jit(lambda z: _value_and_grad(z, variant, "pallas_interpret", **kw))(z)
  v_x, g_x = _value_and_grad(z, variant, "xla", **kw)
  np.testing.assert_allclose(v, v_x, rtol=2e-4)  # bf16 operands (module doc: precision)
  assert float(jnp.linalg.norm(g - g_x) / jnp.linalg.norm(g_x)) < 5e-3  # measured <= 1.7e-3 against float64
  assert not np.any(np.asarray(g)[~mask])
  v_only = jax.jit(lambda z: dispersion_loss(z, variant, impl="pallas_interpret", **kw))(z)
  np.testing.assert_allclose(v_only, v, rtol=1e-6)


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
def test_kernel_lowers_for_cuda_without_a_gpu(semantics):
  """The real Mosaic GPU lowering (layouts, SMEM transforms, wgmma with the transposed key operand)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  sem = getattr(plgpu.LoweringSemantics, semantics)
  spec = (
      jax.ShapeDtypeStruct((2, 128, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((2, 128), jnp.int32),
      jax.ShapeDtypeStruct((2, 128), jnp.int32),
  )
  for variant in dpal.KERNEL_VARIANTS:
    for store_w, tile_n in ((True, 64), (False, 64), (True, 128)):
      f = functools.partial(
          dpal._gram_epilogue,
          variant=variant,
          tau=1.0,
          t=0.1,
          margin=0.5,
          store_w=store_w,
          tile_n=tile_n,
          semantics=sem,
      )
      text = jax.jit(f).trace(*spec).lower(lowering_platforms=("cuda",)).as_text()
      assert "mosaic_gpu" in text


def test_loss_with_the_kernel_lowers_for_cuda_without_a_gpu():
  """The whole term with impl="pallas" (the resolve step, which wants a GPU, is bypassed): value+grad is one kernel
  that stores W ([B, 256, 256] bf16 for L = 200 padded), the value alone a sum-only kernel; no arccos in XLA."""
  loss = functools.partial(
      disp._dispersion_loss,
      variant="angular_spread",
      tau_l2=1.0,
      tau_cos=1.0,
      margin=0.5,
      epsilon=1e-2,
      clamp_threshold=0.1,
      max_tokens=None,
      block_size=None,
      impl="pallas",
  )
  spec = jax.ShapeDtypeStruct((2, 200, 96), jnp.bfloat16)
  lower = lambda f: jax.jit(f).trace(spec).lower(lowering_platforms=("cuda",)).as_text()
  for text, stores_w in (
      (lower(jax.value_and_grad(lambda z: loss(z, None, None, None))), True),
      (lower(lambda z: loss(z, None, None, None)), False),
  ):
    calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert len(calls) == 1 and "chlo.acos" not in text and "stablehlo.acos" not in text
    assert ("tensor<2x256x256xbf16>" in calls[0].split("->")[-1]) == stores_w


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("gpt2", True), ("qwen3", False), ("qwen3", True)])
def test_train_step_with_the_kernel_lowers_for_cuda_without_a_gpu(monkeypatch, family, scan):
  """The whole train step of the GPU benchmark (bf16 compute, dispersion.impl="pallas", remat dots, unrolled and
  nn.scan layers, both families) lowers for CUDA: the kernel (with its W store) is the only pairwise work, inside
  the model's gradient, the objective and the optimizer update; no arccos left to XLA."""
  import os

  from dispersion_jax import config as config_lib
  from dispersion_jax.training import train
  from dispersion_jax.training.train_step import init_state

  resolve = disp.resolve_impl  # its backend check wants a GPU; lowering needs none
  monkeypatch.setattr(disp, "resolve_impl", lambda impl, variant, backend=None: resolve(impl, variant, "gpu"))
  shape = [("model.n_layer", "2"), ("model.n_embd", "128"), ("model.n_head", "2"), ("model.vocab_size", "512")]
  if family == "qwen3":
    shape += [("model.family", "qwen3"), ("model.preset", "tiny"), ("model.n_kv_head", "1")]
  cfg = config_lib.load(
      os.path.join(os.path.dirname(__file__), "..", "configs", "bench.py"),
      shape
      + [
          ("seq_len", "200"),
          ("batch_size", "2"),
          ("model.dtype", "bfloat16"),
          ("model.attention", "xla"),  # cuDNN's lowering checks for the library at trace time
          ("model.scan_layers", str(scan)),
          ("model.remat", "dots"),
          ("dispersion.impl", "pallas"),
          ("dispersion.block_size", "None"),
      ],
  )
  model_cfg = config_lib.model_config(cfg)
  step, tx = train.step_function(cfg, model_cfg)
  state = jax.eval_shape(lambda: init_state(model_cfg, tx, 0))
  tokens = jax.ShapeDtypeStruct((2, 200), jnp.int32)
  batch = dict(input_ids=tokens, targets=tokens, segment_ids=tokens, positions=tokens)
  text = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
  assert calls and all("x256x256xbf16>" in c.split("->")[-1] for c in calls)  # the W tiles stored for backward
  assert "chlo.acos" not in text and "stablehlo.acos" not in text


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the kernel on hardware")
@pytest.mark.parametrize("variant", dpal.KERNEL_VARIANTS)
def test_pallas_on_gpu_equals_xla(variant):
  for seed, offset in ((10, 0.3), (11, 3.0)):  # random, and condensed (cosines ~0.9)
    z = jnp.asarray(_rand((4, 1024, 768), seed=seed) + offset, jnp.float32)
    kw = dict(clamp_threshold=0.1, block_size=None)
    v, g = jax.jit(lambda z: _value_and_grad(z, variant, "pallas", **kw))(z)
    with jax.default_matmul_precision("highest"):
      v_x, g_x = jax.jit(lambda z: _value_and_grad(z, variant, "xla", **kw))(z)
    np.testing.assert_allclose(v, v_x, rtol=1e-4)
    assert float(jnp.linalg.norm(g - g_x) / jnp.linalg.norm(g_x)) < 5e-3
