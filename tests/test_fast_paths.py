"""Every fast path equals the plain path on CPU: values and gradients, within dtype tolerance (tiny shapes)."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dispersion_jax import GPT, DispersionConfig, GPTConfig, dispersion_loss
from dispersion_jax.interop.hf import from_hf_state_dict, to_hf_state_dict
from dispersion_jax.losses.objective import objective
from dispersion_jax.losses.dispersion import VARIANTS
from dispersion_jax.losses.fused_ce import fused_cross_entropy
from dispersion_jax.losses.objective import cross_entropy
from dispersion_jax.models import init_params

DISP = DispersionConfig(coeff=0.1, clamp_threshold=0.1, block_size=None)
CFG = GPTConfig.preset("test", vocab_size=2048)  # a vocabulary large enough that the logits show in memory
B, L = 4, 16


def _compiled_loss_and_grad(cfg: GPTConfig, params, batch, disp: DispersionConfig = DISP, ce_chunk=None):
  """(loss, grads in Hugging Face names (one layout whatever scan_layers is), temp bytes of the compiled step)."""
  fn = jax.jit(jax.value_and_grad(lambda p: objective(p, batch, model=GPT(cfg), disp=disp, ce_chunk=ce_chunk)[0]))
  compiled = fn.lower(params).compile()
  loss, grads = compiled(params)
  return loss, to_hf_state_dict(cfg, grads), compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def plain():
  """The plain path, compiled once: unrolled, no remat, XLA attention, dense logits + CE."""
  params = init_params(CFG, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (B, L + 1), 0, CFG.vocab_size)
  mask = jnp.ones((B, L), jnp.float32).at[0, -3:].set(0.0)  # a few positions without a target
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=mask)
  return params, batch, _compiled_loss_and_grad(CFG, params, batch)


def _assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-7)


# (a) blocked dispersion, float32, the block sizes the bench compares; L = 300: the last block is padded.
@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_dispersion_equals_dense_float32(variant):
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 300, 8)) + 0.3
  f = jax.value_and_grad(lambda z, bs: dispersion_loss(z, variant, clamp_threshold=0.1, block_size=bs))
  v_dense, g_dense = f(z, None)
  for block_size in (128, 256):
    v_blk, g_blk = f(z, block_size)
    np.testing.assert_allclose(v_blk, v_dense, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(g_blk, g_dense, rtol=1e-3, atol=1e-5 * float(jnp.abs(g_dense).max()))


# (b) fused head + cross-entropy.
@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_cross_entropy_equals_plain(chunk):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x, emb = jax.random.normal(k[0], (2, 11, 16)), 0.3 * jax.random.normal(k[1], (37, 16))
  t = jax.random.randint(k[2], (2, 11), 0, 37)
  w = (jax.random.uniform(k[3], (2, 11)) > 0.3).astype(jnp.float32)
  for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    xd, ed = x.astype(dtype), emb.astype(dtype)
    plain = lambda x, e: cross_entropy(jnp.einsum("bld,vd->blv", x, e, preferred_element_type=jnp.float32), t, w)
    fused = lambda x, e: fused_cross_entropy(x, e, t, w, chunk=chunk)
    (v_p, g_p), (v_f, g_f) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(xd, ed) for f in (plain, fused))
    np.testing.assert_allclose(v_f, v_p, rtol=rtol)
    for a, b in zip(g_f, g_p):
      assert a.dtype == b.dtype == dtype
      np.testing.assert_allclose(
          np.asarray(a, np.float32),
          np.asarray(b, np.float32),
          rtol=rtol,
          atol=rtol * float(jnp.abs(b.astype(jnp.float32)).max()),
      )


def test_objective_with_fused_ce_equals_plain_and_drops_the_logits(plain):
  params, batch, want = plain
  got = _compiled_loss_and_grad(CFG, params, batch, ce_chunk=24)
  _assert_same(got, want)
  # Under jit the model's logits are dead code: the step needs more than one [B, L, V] float32 buffer less.
  assert want[2] - got[2] > 4 * B * L * CFG.vocab_size


# (c) attention: cuDNN needs a GPU; on CPU "auto" must give the XLA path's numbers (within float32).
def test_auto_attention_on_cpu_equals_xla(plain):
  params, batch, want = plain
  _assert_same(_compiled_loss_and_grad(dataclasses.replace(CFG, attention="auto"), params, batch), want)


# (d) scan over layers and rematerialisation change the schedule, not the numbers.
@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots")])
def test_scan_and_remat_equal_the_unrolled_model(plain, scan, remat):
  params, batch, want = plain
  cfg = dataclasses.replace(CFG, scan_layers=scan, remat=remat)
  _assert_same(_compiled_loss_and_grad(cfg, from_hf_state_dict(cfg, to_hf_state_dict(CFG, params)), batch), want)


# The PyTorch baseline's dispersion loss is the same definition (bench's same-run comparison relies on it).
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_baseline_dispersion_equals_jax(variant):
  torch = pytest.importorskip("torch")
  from dispersion_jax.benchmarks.bench_torch import dispersion_loss as torch_dispersion

  z = np.random.default_rng(0).normal(size=(2, 9, 6)).astype(np.float64) * 0.5
  zt = torch.tensor(z, requires_grad=True)
  v_t = torch_dispersion(zt, variant, tau_l2=4.0, clamp_threshold=0.1)
  v_t.backward()
  v_j, g_j = jax.value_and_grad(lambda z: dispersion_loss(z, variant, tau_l2=4.0, clamp_threshold=0.1))(
      jnp.asarray(z, jnp.float32)
  )
  np.testing.assert_allclose(v_j, v_t.item(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_j, zt.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_bench_rows_have_the_required_columns(tmp_path):
  from dispersion_jax import config as config_lib
  from dispersion_jax.cli import bench
  from dispersion_jax.models import flops_per_token

  out = tmp_path / "rows.json"
  bench.main(
      [
          "--layers",
          "1",
          "--dim",
          "32",
          "--heads",
          "2",
          "--vocab",
          "128",
          "--seq",
          "8",
          "--batch",
          "2",
          "--repeats",
          "1",
          "--block-size",
          "none",
          "--peak-flops",
          "1e12",
          "--json",
          str(out),
      ]
  )
  rows = json.loads(out.read_text())
  assert [r["coeff"] for r in rows] == [0.0, 0.1]
  for r in rows:
    for key in ("tokens_per_s", "step_ms", "peak_memory_bytes", "compile_s", "mfu", "dispersion_overhead"):
      assert r[key] is not None, key
  assert rows[0]["dispersion_overhead"] == 0.0 and rows[1]["variant"] == "angular_spread"
  n = rows[0]["params"]
  model_cfg = config_lib.model_config(
      config_lib.load(
          os.path.join(os.path.dirname(__file__), "..", "configs", "bench.py"),
          [("model.n_layer", "1"), ("model.n_embd", "32"), ("model.n_head", "2"), ("model.vocab_size", "128")],
      )
  )
  assert flops_per_token(model_cfg, 8) == rows[0]["flops_per_token"] == 6 * (n - 1024 * 32) + 6 * 1 * 8 * 32
