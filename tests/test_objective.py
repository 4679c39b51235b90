"""CE + coeff * dispersion against the float64 Hugging Face reference, and the layer selection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dispersion_jax import GPT, DispersionConfig, GPTConfig, dispersion_loss, hidden_states, select_layers
from dispersion_jax.interop.hf import load_gpt2, to_hf_state_dict
from dispersion_jax import objective
from dispersion_jax.models import init_params


def _hf_batch(ids):
  """HF's labels=input_ids: position t predicts t+1; the last position has no target."""
  ids = jnp.asarray(ids)
  return dict(
      input_ids=ids, targets=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
  )


@pytest.mark.parametrize("scan", [False, True])
def test_objective_and_gradients_match_reference(x64, gpt2_golden, scan):
  path, ref = gpt2_golden
  cfg, params = load_gpt2(path, dtype="float64", param_dtype="float64", scan_layers=scan)
  disp = DispersionConfig(coeff=0.1, clamp_threshold=0.1, loc="all", block_size=16)
  fn = lambda p: objective(p, _hf_batch(ref["input_ids"]), model=GPT(cfg), disp=disp)
  (total, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params)
  np.testing.assert_allclose(metrics["ce"], ref["objective/ce"], rtol=1e-10)
  np.testing.assert_allclose(metrics["dispersion"], ref["objective/dispersion"], rtol=1e-5)
  np.testing.assert_allclose(total, ref["objective/total"], rtol=1e-5)
  assert set(metrics) == {"loss", "ce", "dispersion", "dispersion/layer_1", "dispersion/layer_2", "dispersion/layer_3"}
  hf_grads = to_hf_state_dict(cfg, grads)
  names = [k.removeprefix("objective/grad/") for k in ref if k.startswith("objective/grad/")]
  assert len(names) == 3
  for name in names:
    r = ref[f"objective/grad/{name}"]
    np.testing.assert_allclose(hf_grads[name], r, rtol=1e-5, atol=1e-9 * np.abs(r).max(), err_msg=name)


def test_layer_selection_follows_the_spec():
  assert select_layers("all", 12) == tuple(range(1, 13))
  assert select_layers("last", 12) == (12,)
  assert select_layers("early_half", 12) == tuple(range(1, 7))
  assert select_layers("late_half", 12) == tuple(range(7, 13))
  assert select_layers("early_half", 1) == (1,) and select_layers("late_half", 1) == (1,)
  assert select_layers("early_half", 3) == (1,) and select_layers("late_half", 3) == (2, 3)
  with pytest.raises(ValueError, match="dispersion.loc"):
    DispersionConfig(loc="middle")
  with pytest.raises(ValueError, match="dispersion.variant"):
    DispersionConfig(variant="spread")


@pytest.mark.parametrize("loc", ["last", "early_half", "late_half"])
def test_objective_is_ce_plus_coeff_times_mean_over_selected_layers(loc):
  cfg = GPTConfig.preset("test", n_layer=4)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  batch = _hf_batch(ids)
  disp = DispersionConfig(variant="orthogonalization", coeff=0.7, loc=loc)
  total, metrics = objective(params, batch, model=GPT(cfg), disp=disp)
  _, variables = GPT(cfg).apply({"params": params}, ids, mutable=["intermediates"])
  states = hidden_states(variables)
  want = np.mean([dispersion_loss(states[i], "orthogonalization") for i in select_layers(loc, 4)])
  np.testing.assert_allclose(metrics["dispersion"], want, rtol=1e-6)
  np.testing.assert_allclose(total, metrics["ce"] + 0.7 * want, rtol=1e-6)
  base, base_metrics = objective(params, batch, model=GPT(cfg), disp=DispersionConfig(coeff=0.0))
  np.testing.assert_allclose(base, metrics["ce"], rtol=1e-6)


def test_subsampling_is_seeded_per_layer_and_doc_mask_uses_segments():
  cfg = GPTConfig.preset("test")
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  batch = _hf_batch(ids)
  disp = DispersionConfig(coeff=1.0, max_tokens=4)
  fn = jax.jit(lambda p, r: objective(p, batch, model=GPT(cfg), disp=disp, rng=r)[0])
  a, b = fn(params, jax.random.PRNGKey(3)), fn(params, jax.random.PRNGKey(3))
  assert a == b and a != fn(params, jax.random.PRNGKey(4))
  with pytest.raises(ValueError, match="pass key="):
    objective(params, batch, model=GPT(cfg), disp=disp)
  seg = jnp.concatenate([jnp.ones((2, 8), jnp.int32), 2 * jnp.ones((2, 8), jnp.int32)], axis=1)
  masked = DispersionConfig(coeff=1.0, doc_mask=True)
  with_seg = objective(params, {**batch, "segment_ids": seg}, model=GPT(cfg), disp=masked)[1]["dispersion"]
  without = objective(params, batch, model=GPT(cfg), disp=masked)[1]["dispersion"]
  assert not np.isclose(with_seg, without)


def test_cross_entropy_is_causal_through_gradients():
  """The loss at position t has zero gradient w.r.t. inputs after t (via the position table)."""
  cfg = GPTConfig.preset("test")
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 0, cfg.vocab_size)
  t = 4
  mask = jnp.zeros((1, 10)).at[0, t].set(1.0)
  batch = dict(input_ids=ids, targets=jnp.roll(ids, -1, 1), loss_mask=mask)
  g = jax.grad(lambda p: objective(p, batch, model=GPT(cfg), disp=DispersionConfig())[0])(params)
  g_wpe = np.asarray(g["wpe"]["embedding"])
  assert np.all(np.abs(g_wpe[: t + 1]).sum(-1) > 0) and not np.any(g_wpe[t + 1 :])
  chex.assert_tree_all_finite(g)
