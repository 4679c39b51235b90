"""The Flax GPT-2 against Hugging Face's (float64 goldens), its options, and the HF directory round trip."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dispersion_jax import GPT, GPTConfig, hidden_states
from dispersion_jax.interop.hf import from_hf_state_dict, load_gpt2, save_gpt2, to_hf_state_dict
from dispersion_jax.models import count_params, init_params, param_logical_axes


def _forward(cfg, params, ids, **kw):
  logits, variables = GPT(cfg).apply({"params": params}, jnp.asarray(ids), mutable=["intermediates"], **kw)
  return logits, hidden_states(variables)


@pytest.mark.parametrize("scan", [False, True])
def test_logits_and_every_hidden_state_match_hugging_face(x64, gpt2_golden, scan):
  path, ref = gpt2_golden
  for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
    cfg, params = load_gpt2(path, dtype=dtype, param_dtype=dtype, scan_layers=scan)
    logits, states = _forward(cfg, params, ref["input_ids"])
    assert logits.dtype == jnp.dtype(dtype) and len(states) == cfg.n_layer + 1
    np.testing.assert_allclose(logits, ref["logits"], atol=tol, rtol=tol)
    for i, h in enumerate(states):  # the last state is the final block output AFTER ln_f, as in HF
      np.testing.assert_allclose(h, ref[f"hidden_states/{i}"], atol=tol, rtol=tol, err_msg=f"state {i}")


def test_hf_round_trip_is_exact_and_accepts_original_unprefixed_names(gpt2_golden, tmp_path):
  path, _ = gpt2_golden
  on_disk = load_file(os.path.join(path, "model.safetensors"))
  cfg, params = load_gpt2(path)
  back = to_hf_state_dict(cfg, params)
  assert set(back) == set(on_disk) - {"lm_head.weight"}
  for k in back:
    np.testing.assert_array_equal(back[k], on_disk[k])
  # The original `gpt2` checkpoints have no `transformer.` prefix and carry attention-mask buffers.
  legacy = {k.removeprefix("transformer."): v for k, v in on_disk.items()}
  legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  chex.assert_trees_all_equal(from_hf_state_dict(cfg, legacy), params)
  save_gpt2(str(tmp_path), cfg, params)
  cfg2, params2 = load_gpt2(str(tmp_path))
  assert cfg2 == cfg
  chex.assert_trees_all_equal(params2, params)
  assert json.load(open(tmp_path / "config.json"))["model_type"] == "gpt2"


def test_scanned_and_unrolled_models_agree_and_convert(gpt2_golden):
  path, ref = gpt2_golden
  cfg_u, p_u = load_gpt2(path)
  cfg_s, p_s = load_gpt2(path, scan_layers=True, remat="full")
  assert p_s["h"]["attn"]["c_attn"]["kernel"].shape == (3, 64, 192)
  chex.assert_trees_all_equal(to_hf_state_dict(cfg_s, p_s), to_hf_state_dict(cfg_u, p_u))
  lu, su = _forward(cfg_u, p_u, ref["input_ids"])
  ls, ss = _forward(cfg_s, p_s, ref["input_ids"])
  chex.assert_trees_all_close((lu, su), (ls, ss), atol=1e-5)


def test_bad_hf_directories_fail_with_one_line(tmp_path, gpt2_golden):
  with pytest.raises(ValueError, match="config.json and model.safetensors"):
    load_gpt2(str(tmp_path))
  path, _ = gpt2_golden
  cfg, params = load_gpt2(path)
  state = to_hf_state_dict(cfg, params)
  with pytest.raises(ValueError, match="config and weights disagree"):
    from_hf_state_dict(
        GPTConfig.preset("test", vocab_size=512, n_embd=64, n_positions=64, n_layer=3, n_head=4, n_inner=128), state
    )
  with pytest.raises(ValueError, match="lacks"):
    from_hf_state_dict(cfg, {k: v for k, v in state.items() if "ln_f" not in k})


@pytest.mark.parametrize("scan", [False, True])
def test_causality_through_gradients(scan):
  """Logits at position t do not depend on positions after t: row j of the position table only feeds token j."""
  cfg = GPTConfig.preset("test", scan_layers=scan)
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
  params = init_params(cfg, jax.random.PRNGKey(0))

  def logit_sum_at(wpe, t):
    p = {**params, "wpe": {"embedding": wpe}}
    return GPT(cfg).apply({"params": p}, ids)[0, t].sum()

  for t in (0, 3, 7):
    g_PxD = jax.grad(logit_sum_at)(params["wpe"]["embedding"], t)
    assert np.all(np.abs(g_PxD[: t + 1]).sum(-1) > 0) and not np.any(g_PxD[t + 1 :])


def test_mixed_precision_keeps_float32_params_and_logits():
  cfg = GPTConfig.preset("test", dtype="bfloat16")
  ids = jnp.zeros((2, 8), jnp.int32)
  params = init_params(cfg, jax.random.PRNGKey(0))
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  logits, states = _forward(cfg, params, ids)
  assert logits.dtype == jnp.float32 and states[1].dtype == jnp.bfloat16
  assert count_params(params) == sum(x.size for x in jax.tree.leaves(params))


def test_dropout_needs_an_rng_and_is_off_by_default():
  cfg = GPTConfig.preset("test", dropout=0.5)
  ids = jnp.zeros((2, 8), jnp.int32)
  params = init_params(cfg, jax.random.PRNGKey(0))
  a = GPT(cfg).apply({"params": params}, ids)
  np.testing.assert_array_equal(a, GPT(cfg).apply({"params": params}, ids))
  b = GPT(cfg).apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)


def test_presets_have_gpt2_sizes():
  sizes = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}
  for name, n in sizes.items():
    cfg = GPTConfig.preset(name)
    assert count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))) == n
  axes = param_logical_axes(GPTConfig.preset("test", scan_layers=True))
  assert tuple(axes["h"]["mlp"]["c_fc"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(axes["wte"]["embedding"]) == ("vocab", "embed")
  with pytest.raises(ValueError, match="unknown model preset"):
    GPTConfig.preset("gpt5")
