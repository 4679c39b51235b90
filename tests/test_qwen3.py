"""The Flax Qwen3 against Hugging Face's (float64-exact goldens), its building blocks, and the HF interchange.
Its configuration (config.json, presets, errors): tests/test_qwen3_config.py."""

import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dispersion_jax import DispersionConfig
from dispersion_jax.interop.hf import (
  config_from_json,
  from_hf_state_dict,
  load_gpt2,
  load_pretrained,
  save_pretrained,
  to_hf_state_dict,
)
from dispersion_jax.losses.objective import objective
from dispersion_jax.models import Qwen3, Qwen3Config, attention, build_model, hidden_states, init_params, lm_head, qwen3


@pytest.fixture(scope="module")
def golden(golden_dir):
  path = os.path.join(golden_dir, "qwen3_tiny")
  with open(os.path.join(golden_dir, "qwen3_tiny_reference.json")) as fh:
    meta = json.load(fh)
  return path, dict(np.load(os.path.join(golden_dir, "qwen3_tiny_reference.npz"))), meta


@functools.cache
def _apply(cfg):
  return jax.jit(lambda p, i, pos: build_model(cfg).apply({"params": p}, i, pos, mutable=["intermediates"]))


def _forward(cfg, params, ids, positions=None):
  """(logits, variables); one compilation per config (and x64 mode, which jax.jit keys on)."""
  ids = jnp.asarray(ids)
  return _apply(cfg)(
      params, ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape) if positions is None else positions
  )


def _hf_batch(ids):
  """HF's labels=input_ids: position t predicts t+1; the last position has no target."""
  ids = jnp.asarray(ids)
  return dict(
      input_ids=ids, targets=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
  )


def _copy_checkpoint(src, dst, state=None, **config_changes):
  """A copy of an HF directory with its state dict and config.json keys replaced."""
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as fh:
    hf = {**json.load(fh), **config_changes}
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(hf, fh)
  if state is None:
    shutil.copy(os.path.join(src, "model.safetensors"), dst)
  else:
    save_file(state, os.path.join(dst, "model.safetensors"))
  return str(dst)


# ------------------------------------------------------------------------------------------------ golden parity


@pytest.mark.parametrize("scan", [False, True])
def test_logits_and_every_hidden_state_match_hugging_face(x64, golden, scan):
  path, ref, _ = golden
  for dtype, tol in (("float64", 1e-10), ("float32", 1e-5)):
    cfg, params = load_pretrained(path, dtype=dtype, param_dtype=dtype, scan_layers=scan)
    assert isinstance(cfg, Qwen3Config) and cfg.n_head * cfg.head_dim != cfg.n_embd and cfg.tie_embeddings
    logits, variables = _forward(cfg, params, ref["input_ids"])
    states = hidden_states(variables)
    assert logits.dtype == jnp.dtype(dtype) and len(states) == cfg.n_layer + 1
    np.testing.assert_allclose(logits, ref["logits"], atol=tol, rtol=tol)
    for i, h in enumerate(states):  # the last state is the final block output AFTER the final norm, as in HF
      np.testing.assert_allclose(h, ref[f"hidden_states/{i}"], atol=tol, rtol=tol, err_msg=f"{dtype} state {i}")
  # final_norm=False: the raw last block, whose RMSNorm (weights from the checkpoint) is HF's last state.
  raw = hidden_states(variables, final_norm=False)
  chex.assert_trees_all_equal(raw[:-1], states[:-1])
  x = np.asarray(raw[-1], np.float64)
  w = load_file(os.path.join(path, "model.safetensors"))["model.norm.weight"]
  normed = w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
  np.testing.assert_allclose(normed, ref[f"hidden_states/{cfg.n_layer}"], atol=1e-5)
  assert np.abs(x - normed).max() > 0.1  # the two conventions differ


@pytest.mark.parametrize("scan", [False, True])
def test_objective_and_gradients_match_reference(x64, golden, scan):
  path, ref, meta = golden
  assert "0.1 *" in meta["objective"] and "clamp_threshold=0.25" in meta["objective"]
  cfg, params = load_pretrained(
      path, dtype="float64", param_dtype="float64", scan_layers=scan, remat="full" if scan else "none"
  )
  disp = DispersionConfig(coeff=0.1, clamp_threshold=0.25, loc="all", block_size=16 if scan else None)
  batch = _hf_batch(ref["input_ids"])
  fn = jax.jit(jax.value_and_grad(lambda p: objective(p, batch, model=Qwen3(cfg), disp=disp), has_aux=True))
  (total, metrics), grads = fn(params)
  # The authors' loss subtracts log(#pairs) as a float32 constant (tests/test_dispersion.py); undo that offset.
  L = ref["input_ids"].shape[1]
  offset = float(np.log(np.float32(L * (L - 1)))) - np.log(L * (L - 1))
  np.testing.assert_allclose(metrics["ce"], ref["objective/ce"], rtol=1e-12)
  np.testing.assert_allclose(metrics["dispersion"] - offset, ref["objective/dispersion"], rtol=1e-10)
  np.testing.assert_allclose(total - 0.1 * offset, ref["objective/total"], rtol=1e-10)
  hf_grads = to_hf_state_dict(cfg, grads)
  assert len(meta["grads"]) == 5
  for name in meta["grads"]:  # tied: the embedding's gradient sums the input lookup and the head
    r = ref[f"objective/grad/{name}"]
    np.testing.assert_allclose(hf_grads[name], r, rtol=1e-8, atol=1e-12 * np.abs(r).max(), err_msg=name)


# ------------------------------------------------------------------------------------------- HF interchange


def test_untied_and_tied_with_head_checkpoints_load(x64, golden, tmp_path):
  path, ref, _ = golden
  state = load_file(os.path.join(path, "model.safetensors"))
  emb = state["model.embed_tokens.weight"]
  tied_cfg, tied = load_pretrained(path, dtype="float64", param_dtype="float64")
  tied_logits, _ = _forward(tied_cfg, tied, ref["input_ids"])
  # Untied with lm_head = 2 * embedding: the head is really used, so the logits double exactly.
  untied_dir = _copy_checkpoint(
      path, tmp_path / "untied", {**state, "lm_head.weight": 2 * emb}, tie_word_embeddings=False
  )
  cfg, params = load_pretrained(untied_dir, dtype="float64", param_dtype="float64")
  assert not cfg.tie_embeddings and params["lm_head"]["kernel"].shape == (64, 512)
  logits, _ = _forward(cfg, params, ref["input_ids"])
  np.testing.assert_allclose(logits, 2 * tied_logits, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(lm_head(params, cfg), 2 * emb)
  assert to_hf_state_dict(cfg, params).keys() == state.keys() | {"lm_head.weight"}
  # A tied checkpoint that also stores a (here deliberately wrong) head: HF ignores it, so do we.
  both_dir = _copy_checkpoint(path, tmp_path / "both", {**state, "lm_head.weight": 0 * emb})
  chex.assert_trees_all_equal(load_pretrained(both_dir, dtype="float64", param_dtype="float64")[1], tied)
  # Untied without its head fails with one line.
  no_head = _copy_checkpoint(path, tmp_path / "no_head", state, tie_word_embeddings=False)
  with pytest.raises(ValueError, match="lm_head.weight") as e:
    load_pretrained(no_head)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_checkpoint_loads(golden, tmp_path, dtype):
  path, _, _ = golden
  state = {
      k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
      for k, v in load_file(os.path.join(path, "model.safetensors")).items()
  }
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: state[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}})
  )
  cfg, params = load_pretrained(str(tmp_path))
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  back = to_hf_state_dict(cfg, params)
  assert back.keys() == state.keys()
  for k in back:  # widening is exact
    np.testing.assert_array_equal(back[k], state[k].astype(np.float32), err_msg=k)
  _, half = load_pretrained(str(tmp_path), param_dtype=dtype, scan_layers=True)
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(dtype)}
  np.testing.assert_array_equal(
      half["h"]["self_attn"]["q_proj"]["kernel"][1], state["model.layers.1.self_attn.q_proj.weight"].T
  )
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is listed"):
    load_pretrained(str(tmp_path))


def test_round_trips_are_exact(golden, tmp_path):
  path, _, _ = golden
  on_disk = load_file(os.path.join(path, "model.safetensors"))
  cfg, params = load_pretrained(path)
  back = to_hf_state_dict(cfg, params)
  assert back.keys() == on_disk.keys()  # tied: no lm_head.weight
  for k in back:
    np.testing.assert_array_equal(back[k], on_disk[k], err_msg=k)
  cfg_s, p_s = load_pretrained(path, scan_layers=True)
  assert p_s["h"]["self_attn"]["q_proj"]["kernel"].shape == (3, 64, 128)
  chex.assert_trees_all_equal(to_hf_state_dict(cfg_s, p_s), back)
  chex.assert_trees_all_equal(from_hf_state_dict(cfg_s, back), p_s)
  save_pretrained(str(tmp_path), cfg_s, p_s)
  cfg2, p2 = load_pretrained(str(tmp_path), scan_layers=True)
  assert cfg2 == cfg_s
  chex.assert_trees_all_equal(p2, p_s)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["model_type"] == "qwen3" and hf["architectures"] == ["Qwen3ForCausalLM"] and hf["head_dim"] == 32
  assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="not GPT-2; use hf.load_pretrained"):
    load_gpt2(path)


def test_transformers_loads_our_export_and_reproduces_our_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for tie in (True, False):
    cfg = Qwen3Config.preset("test", tie_embeddings=tie)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # Random norm weights (fresh ones are all 1, which would hide a swapped or missing norm).
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1 + 0.3 * np.random.default_rng(len(p)).standard_normal(x.shape, np.float32))
        if p[-1].key == "scale"
        else x,
        params,
    )
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size))
    ours, _ = _forward(cfg, params, ids)
    save_pretrained(str(tmp_path / str(tie)), cfg, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / str(tie))).float().eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
      theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_config_from_json_dispatches_on_model_type(golden, gpt2_golden):
  assert isinstance(config_from_json(golden[0], scan_layers=True), Qwen3Config)
  assert not isinstance(config_from_json(gpt2_golden[0]), Qwen3Config)


# ------------------------------------------------------------------------------------------------ unit tests


def test_gqa_query_head_h_reads_kv_head_h_over_group_size():
  B, L, H, G, K = 2, 6, 4, 2, 8
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((B, L, n, K), np.float32) for n in (H, G, G))
  attend = jax.jit(attention.attention, static_argnums=3)
  out = attend(q, k, v, "xla")
  causal = np.tril(np.ones((L, L), bool))
  for h in range(H):  # HF's repeat_kv: query head h uses kv head h // (H // G)
    g = h // (H // G)
    s = np.where(causal, np.einsum("blk,bmk->blm", q[:, :, h], k[:, :, g]) / np.sqrt(K), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[:, :, h], np.einsum("blm,bmk->blk", p, v[:, :, g]), atol=1e-5, err_msg=h)
  # jax.nn.dot_product_attention (whose cuDNN implementation the model uses on GPU) groups heads the same way.
  np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, is_causal=True), out, atol=1e-5)
  assert not np.allclose(attend(q, k[:, :, ::-1], v[:, :, ::-1], "xla"), out, atol=1e-3)


def test_rope_is_rotate_half_and_relative():
  B, L, N, K = 1, 5, 2, 8
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, B, L, N, K), np.float32)
  pos = np.arange(L)[None]
  rope = jax.jit(lambda t, p: qwen3.apply_rope(t, *qwen3.rope_tables(p, K, 1e4, jnp.float32)))
  out = rope(x, pos)
  # Closed form: pair (i, i + K/2) rotated by angle pos * theta^(-2i/K).
  ang = np.arange(L)[:, None] * 10000.0 ** (-np.arange(0, K, 2) / K)
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., : K // 2], x[..., K // 2 :]
  np.testing.assert_allclose(out, np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1), atol=1e-5)
  # Relative: q.k scores are unchanged when every position shifts by the same constant.
  scores = lambda p: np.einsum("blnk,bmnk->bnlm", rope(x, p), rope(y, p))
  np.testing.assert_allclose(scores(pos + 7), scores(pos), atol=1e-4)
  assert not np.allclose(scores(pos * 2), scores(pos), atol=1e-2)
  # ... and so are the model's logits.
  cfg = Qwen3Config.preset("test")
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8))
  base, _ = _forward(cfg, params, ids)
  shifted, _ = _forward(cfg, params, ids, np.arange(8)[None].repeat(2, 0) + 11)
  np.testing.assert_allclose(shifted, base, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_causality_through_gradients(scan):
  """Logits at t do not depend on tokens after t: untied, with distinct tokens, embedding row j feeds position j."""
  cfg = Qwen3Config.preset("test", scan_layers=scan, tie_embeddings=False)
  ids = jax.random.permutation(jax.random.PRNGKey(1), cfg.vocab_size)[:8][None]
  params = init_params(cfg, jax.random.PRNGKey(0))

  def logit_sums_L(emb):
    return Qwen3(cfg).apply({"params": {**params, "embed_tokens": {"embedding": emb}}}, ids)[0].sum(-1)

  g_LxVxD = jax.jit(jax.jacrev(logit_sums_L))(params["embed_tokens"]["embedding"])
  for t in range(8):
    g_LxD = np.asarray(g_LxVxD[t])[ids[0]]  # embedding rows in position order
    assert np.all(np.abs(g_LxD[: t + 1]).sum(-1) > 0) and not np.any(g_LxD[t + 1 :]), t


def test_lm_head_path_and_fused_cross_entropy_agree_with_the_model():
  cfg = Qwen3Config.preset("test", tie_embeddings=False)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert lm_head(params, cfg).shape == (cfg.vocab_size, cfg.n_embd)
  assert qwen3.EMBED_PATH == ("embed_tokens", "embedding") and "embedding" in params["embed_tokens"]
  batch = _hf_batch(jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size))
  loss = jax.jit(
      lambda p, chunk: objective(p, batch, model=Qwen3(cfg), disp=DispersionConfig(), ce_chunk=chunk)[0],
      static_argnums=1,
  )
  np.testing.assert_allclose(loss(params, 8), loss(params, None), rtol=1e-6)


def test_mixed_precision_keeps_float32_params_logits_and_norm_statistics():
  for tie in (True, False):
    cfg = Qwen3Config.preset("test", dtype="bfloat16", tie_embeddings=tie)
    params = init_params(cfg, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    logits, variables = _forward(cfg, params, jnp.zeros((2, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and hidden_states(variables)[1].dtype == jnp.bfloat16
  # float16 would overflow squaring 300 (65504 max): the statistics must be computed in float32.
  norm = qwen3.RMSNorm(1e-6, "embed", "float32", "float16")
  x = jnp.full((2, 16), 300.0, jnp.float16)
  y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  assert y.dtype == jnp.float16
  np.testing.assert_allclose(y, 1.0, atol=1e-3)
  # HF's cast order: normalise in float32, cast to the compute dtype, THEN multiply by the (cast) weight.
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(2), (16,))
  norm = qwen3.RMSNorm(1e-6, "embed", "float32", "bfloat16")
  x32 = np.asarray(x, np.float32)
  y32 = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(norm.apply({"params": {"scale": w}}, x), np.asarray(w, ml_dtypes.bfloat16) * y32)
