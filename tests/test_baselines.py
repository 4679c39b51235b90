"""The paper's baselines as the authors run them: NEFTune-style embedding noise and active forgetting."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dispersion_jax import config as config_lib
from dispersion_jax.losses.objective import DispersionConfig, objective
from dispersion_jax.models import GPTConfig, build_model, init_params
from dispersion_jax.models.neftune import add_embedding_noise, neftune_bound
from dispersion_jax.training import saved_run, train
from dispersion_jax.training.baselines import BaselineConfig, Forgetting, forgetting_lr
from dispersion_jax.training.optim import OptimizerConfig, make_optimizer
from dispersion_jax.training.train_step import eval_step, init_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GPTConfig.preset("test")  # vocab 128, 2 layers, width 32
EMBED = ("wte", "embedding")


def _batch(B=4, L=16, seed=1):
  ids = jax.random.randint(jax.random.PRNGKey(seed), (B, L + 1), 0, CFG.vocab_size)
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


# --- NEFTune ---------------------------------------------------------------------------------------------------


def test_noise_is_uniform_within_the_authors_bound():
  x = jnp.zeros((8, 64, 32))
  m = neftune_bound(5.0, 64, 32)
  assert m == pytest.approx(5.0 / math.sqrt(64 * 32))
  noise = np.asarray(add_embedding_noise(x, 5.0, jax.random.PRNGKey(0)))
  assert np.abs(noise).max() <= m and np.abs(noise).max() > 0.99 * m
  assert abs(noise.mean()) < 0.02 * m
  np.testing.assert_allclose(noise.var(), m * m / 3, rtol=0.02)  # the variance of U(-m, m)
  # The paper's bounds: Qwen3-0.6B at 4096 tokens, GPT-2 at 1024.
  assert neftune_bound(5.0, 4096, 1024) == pytest.approx(2.4414e-3, rel=1e-4)
  assert neftune_bound(1.0, 1024, 768) == pytest.approx(1.1276e-3, rel=1e-4)


def test_the_model_adds_the_noise_to_its_embedding_output_only_when_asked():
  params = init_params(CFG, jax.random.PRNGKey(0))
  ids = _batch()["input_ids"]
  model = build_model(CFG)
  _, clean = model.apply({"params": params}, ids, mutable=["intermediates"])
  _, noisy = model.apply(
      {"params": params}, ids, embed_noise_alpha=1.0, rngs={"noise": jax.random.PRNGKey(3)}, mutable=["intermediates"]
  )
  diff = np.asarray(noisy["intermediates"]["embed"][0] - clean["intermediates"]["embed"][0])
  m = neftune_bound(1.0, ids.shape[1], CFG.n_embd)
  assert 0.9 * m < np.abs(diff).max() <= m * (1 + 1e-6)


def test_noise_is_fresh_per_step_and_per_micro_batch_and_absent_in_evaluation():
  params = init_params(CFG, jax.random.PRNGKey(0))
  tx = make_optimizer(OptimizerConfig(), 10)
  state = init_state(CFG, tx, 0, params)
  mb = _batch(B=2)
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), mb)  # two identical micro-batches
  disp = DispersionConfig(coeff=0.0)
  step = jax.jit(
      lambda s, b, k: train_step(
          s,
          b,
          model=build_model(CFG),
          disp=disp,
          tx=tx,
          schedule=optax.constant_schedule(1e-3),
          grad_accum=k,
          embed_noise_alpha=5.0,
      ),
      static_argnums=2,
  )
  _, m2 = step(state, batch, 2)
  # The step's loss is the mean of the two micro-batches with their own keys (fold_in of the step key and index).
  step_rng = jax.random.fold_in(state.rng, state.step)
  per_mb = [
      objective(
          params, mb, model=build_model(CFG), disp=disp, rng=jax.random.fold_in(step_rng, i), embed_noise_alpha=5.0
      )[0]
      for i in (0, 1)
  ]
  assert per_mb[0] != per_mb[1]  # different draws for the two micro-batches
  np.testing.assert_allclose(m2["loss"], np.mean(per_mb), rtol=1e-6)
  # Another step draws other noise: same params, step counter + 1.
  _, m_next = step(state.replace(step=state.step + 1), batch, 2)
  assert m_next["loss"] != m2["loss"]
  # Evaluation never adds noise: its CE is the clean forward's.
  clean, _ = objective(params, mb, model=build_model(CFG), disp=disp)
  out = eval_step(params, mb, model=build_model(CFG), disp=disp, with_dispersion=False)
  np.testing.assert_allclose(out["ce_sum"] / out["tokens"], clean, rtol=1e-6)


# --- active forgetting -----------------------------------------------------------------------------------------


def _authors_embedding_lr(T: int, K: int, le: int, peak=5e-5, warmup_ratio=0.08) -> float:
  """A transcription of their ActiveForgettingLRScheduler (plasticity `speed = tot // K`; le = completed steps)."""
  speed, warm = T // K, int(warmup_ratio * T)
  ei = ((le + 1) * speed) % T
  mult = ei / max(1, warm) if ei < warm else max(0.0, (T - ei) / max(1, T - warm))
  return peak * mult


@pytest.mark.parametrize("T", [1526, 5000, 800])
def test_the_embedding_learning_rate_is_the_authors_schedule(T):
  schedule = forgetting_lr(BaselineConfig(method="active_forgetting"), T)
  for step in (1, 2, 121, 122, 123, 999, 1000, 1001, 1002, T - 1, T):  # optimizer step s uses optax count s - 1
    if step <= T:
      np.testing.assert_allclose(
          float(schedule(step - 1)),
          _authors_embedding_lr(T, 1000, step - 1),
          rtol=1e-6,
          atol=1e-12,
          err_msg=f"T={T} step {step}",
      )
  if T == 1526:  # the reference values of shared/docs/qwen3-and-baselines.md 4.2
    np.testing.assert_allclose(
        [schedule(0), schedule(121), schedule(1000), schedule(1525)],
        [4.098e-7, 5e-5, 1.8697e-5, 0.0],
        rtol=1e-3,
        atol=1e-12,
    )
  if T == 5000:
    np.testing.assert_allclose([schedule(999), schedule(1000)], [0.0, 6.25e-7], rtol=1e-6, atol=1e-12)
  if T == 800:  # T < K: the embedding never trains
    assert all(float(schedule(c)) == 0.0 for c in range(0, T, 37))


def _af_step(every: int):
  base = BaselineConfig(method="active_forgetting", forget_every=every)
  tx = make_optimizer(OptimizerConfig(warmup=0), 10, base, EMBED)
  forget = Forgetting(every, 0.02, 7, EMBED)
  fn = jax.jit(
      lambda s, b: train_step(
          s,
          b,
          model=build_model(CFG),
          disp=DispersionConfig(coeff=0.0),
          tx=tx,
          schedule=optax.constant_schedule(1e-3),
          grad_accum=1,
          forgetting=forget,
      )
  )
  return tx, fn


def _embed_adam(opt_state):
  inner = opt_state[1].inner_states  # chain(clip, multi_transform)
  return inner["embed"].inner_state[0], inner["body"].inner_state[0]


def test_a_reset_redraws_the_embedding_and_clears_only_its_adam_state():
  params = init_params(CFG, jax.random.PRNGKey(0))
  tx, reset_at_2 = _af_step(every=2)
  _, never = _af_step(every=10_000)
  state = init_state(CFG, tx, 0, params)
  batch = _batch()
  state, _ = reset_at_2(state, batch)  # step 1: no reset
  a, _ = reset_at_2(state, batch)  # step 2: reset after the update
  b, _ = never(state, batch)  # the same step 2 without a reset
  emb = np.asarray(a.params["wte"]["embedding"])
  assert not np.any(emb[7]) and np.std(np.delete(emb, 7, 0)) == pytest.approx(0.02, rel=0.05)
  assert not np.allclose(emb, b.params["wte"]["embedding"])
  emb_adam, body_adam = _embed_adam(a.opt_state)
  assert int(emb_adam.count) == 0 and not np.any(emb_adam.mu["wte"]["embedding"])
  assert not np.any(emb_adam.nu["wte"]["embedding"])
  b_emb_adam, b_body_adam = _embed_adam(b.opt_state)
  assert int(b_emb_adam.count) == 2 and np.any(b_emb_adam.mu["wte"]["embedding"])
  # The rest is untouched: other parameters, the body's moments and count, the schedules' counts, the step.
  chex.assert_trees_all_equal(
      {k: v for k, v in a.params.items() if k != "wte"}, {k: v for k, v in b.params.items() if k != "wte"}
  )
  chex.assert_trees_all_equal(body_adam, b_body_adam)
  chex.assert_trees_all_equal(
      a.opt_state[1].inner_states["embed"].inner_state[2], b.opt_state[1].inner_states["embed"].inner_state[2]
  )  # its schedule count goes on
  assert int(a.step) == int(b.step) == 2


def test_baselines_are_ce_only_unless_combined_on_purpose():
  cfg = config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), [("baseline.method", "neftune")])
  with pytest.raises(config_lib.ConfigError, match="CE only; set dispersion.coeff=0"):
    config_lib.validate(cfg)
  config_lib.apply_override(cfg, "baseline.with_dispersion", "true")
  config_lib.validate(cfg)
  with pytest.raises(config_lib.ConfigError, match="baseline.method='forget'"):
    config_lib.baseline_config(
        config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), [("baseline.method", "forget")])
    )


@pytest.mark.slow
def test_active_forgetting_resumes_exactly_across_a_reset_sharded_and_accumulated(tmp_path, corpus_dir):
  flags = [
      "model.n_layer=2",
      "model.n_embd=32",
      "model.n_head=4",
      "model.n_positions=32",
      "seq_len=32",
      "batch_size=8",
      "grad_accum=2",
      "eval_every=None",
      "log_every=1",
      "steps=5",
      "checkpoint_every=2",
      "dispersion.coeff=0",
      "baseline.method=active_forgetting",
      "baseline.forget_every=2",
      "baseline.forget_emb_lr=1e-3",
      f"data.data_dir={corpus_dir}",
  ]
  if jax.device_count() >= 8:
    flags += ["mesh.data=4", "mesh.fsdp=2"]
  cfg = config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), flags)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert train.run(cfg, straight) == 5
  assert train.run(cfg, resumed, stop_at=3) == 3
  assert train.run(cfg, resumed) == 5

  def loss(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
      return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}

  assert loss(straight) == loss(resumed) and sorted(loss(straight)) == [1, 2, 3, 4, 5]
  # The checkpoint taken at step K already holds the fresh embedding; its pad row is the tokenizer's EOS (50256).
  _, _, state = saved_run.load_run(straight, step=2)
  emb = np.asarray(state.params["wte"]["embedding"])
  assert not np.any(emb[50256]) and np.std(emb[:1000]) == pytest.approx(0.02, rel=0.1)
