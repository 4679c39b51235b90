"""LoRA (lora.py, models/lora_dense.py, the LoRA train step): step 0 is the base model, the in-layer adapters equal the
merged weights and a float64 NumPy re-derivation, only the adapters train and hold optimizer state, sharding,
the base fingerprint, config errors. PEFT files: test_lora_peft.py; training runs: test_lora_train.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dispersion_jax import config as config_lib
from dispersion_jax.compile.dry_run import memory_per_device
from dispersion_jax.errors import ConfigError
from dispersion_jax.losses.objective import DispersionConfig, objective
from dispersion_jax.models import GPTConfig, Qwen3Config, build_model, init_params, lora, param_shapes
from dispersion_jax.parallel import sharding
from dispersion_jax.training.optim import OptimizerConfig, make_optimizer
from dispersion_jax.training.train_step import init_state, state_shardings, train_step

FAMILIES = {"gpt2": GPTConfig, "qwen3": Qwen3Config}
CASES = [(f, scan) for f in FAMILIES for scan in (False, True)]


def _cfg(family, scan, **kw):
  return FAMILIES[family].preset("test", scan_layers=scan, **kw)


def _spec(model_cfg, params, rank=4, alpha=8.0, dropout=0.0, targets=None):
  return lora.LoraSpec(rank, alpha, dropout, lora.select_targets(model_cfg, params, targets))


def _random_b(adapters, key, std=0.1):
  flat = traverse_util.flatten_dict(adapters)
  out = {}
  for i, (p, v) in enumerate(sorted(flat.items())):
    out[p] = std * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) if p[-1] == "b" else v
  return traverse_util.unflatten_dict(out)


def _batch(vocab, B=2, L=16, seed=0):
  ids = jax.random.randint(jax.random.PRNGKey(seed), (B, L), 0, vocab)
  return {"input_ids": ids, "targets": jnp.roll(ids, -1, 1)}


@pytest.mark.parametrize("family,scan", [("gpt2", False), ("qwen3", True)])
def test_step_0_is_the_base_model_exactly(family, scan):
  """B = 0 at init: logits and the loss (CE + dispersion) equal the base model's bit for bit, op by op (eagerly:
  the same kernels run on the same inputs). Jitted, the two programs may differ in the last bit (XLA fuses the
  base computation differently once the adapter ops are in the graph, even with A = B = 0), so that is checked to
  float32 rounding."""
  cfg = _cfg(family, scan)
  params = init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(cfg, params)
  adapters = lora.init_adapters(spec, params, jax.random.PRNGKey(1))
  assert all(float(jnp.abs(x).max()) > 0 for p, x in traverse_util.flatten_dict(adapters).items() if p[-1] == "a")
  model, batch = build_model(cfg), _batch(cfg.vocab_size)

  def logits_and_loss(variables):
    loss, _ = objective(
        variables["params"], batch, model=model, disp=DispersionConfig(coeff=0.1), adapters=variables.get("lora")
    )
    return model.apply(variables, batch["input_ids"]), loss

  base, with_lora = {"params": params}, {"params": params, "lora": lora.scaled(adapters, spec.scale)}
  (logits_b, loss_b), (logits_l, loss_l) = logits_and_loss(base), logits_and_loss(with_lora)
  np.testing.assert_array_equal(np.asarray(logits_l), np.asarray(logits_b))
  assert float(loss_l) == float(loss_b)
  jitted = jax.jit(logits_and_loss)
  np.testing.assert_allclose(np.asarray(jitted(with_lora)[0]), np.asarray(logits_b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(jitted(with_lora)[1]), float(loss_b), rtol=1e-6)


@pytest.mark.parametrize("family,scan", CASES)
def test_adapters_in_their_layers_equal_the_merged_weights_in_float64(family, scan, x64):
  cfg = _cfg(family, scan, dtype="float64", param_dtype="float64")
  params = init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(cfg, params, rank=3, alpha=5.0)
  adapters = _random_b(lora.init_adapters(spec, params, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
  adapters = jax.tree.map(lambda x: x.astype(jnp.float64), adapters)  # B * alpha / r not rounded to float32
  model, ids = build_model(cfg), _batch(cfg.vocab_size)["input_ids"]
  apply = jax.jit(lambda variables: model.apply(variables, ids))
  in_layer = apply({"params": params, "lora": lora.scaled(adapters, spec.scale)})
  merged = apply({"params": lora.merge(params, adapters, spec.scale)})
  base = apply({"params": params})
  assert float(jnp.abs(in_layer - base).max()) > 1e-3  # the adapters do something
  np.testing.assert_allclose(np.asarray(in_layer), np.asarray(merged), rtol=1e-12, atol=1e-12)


def test_merge_equals_a_float64_numpy_rederivation(x64):
  """Property-style: random shapes (with and without a leading layer axis), ranks, scales and dtypes."""
  rng = np.random.default_rng(0)
  for trial in range(25):
    lead = (int(rng.integers(1, 4)),) if trial % 2 else ()
    n_in, n_out, r = (int(v) for v in rng.integers(1, 40, 3))
    scale = float(rng.uniform(0.1, 8.0))
    dtype = [np.float64, np.float32][trial % 3 == 0]
    w = rng.normal(size=(*lead, n_in, n_out)).astype(dtype)
    a, b = rng.normal(size=(*lead, n_in, r)), rng.normal(size=(*lead, r, n_out))
    params = {"h": {"mlp": {"c_fc": {"kernel": w, "bias": np.zeros(n_out)}}}}
    adapters = {"h": {"mlp": {"c_fc": {"a": a.astype(np.float32), "b": b.astype(np.float32)}}}}
    got = lora.merge(params, adapters, scale)["h"]["mlp"]["c_fc"]
    a32, b32 = adapters["h"]["mlp"]["c_fc"]["a"], adapters["h"]["mlp"]["c_fc"]["b"]
    want = w.astype(np.float64) + np.matmul(a32.astype(np.float64), b32.astype(np.float64)) * scale
    assert got["kernel"].dtype == jnp.promote_types(dtype, jnp.float32)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(np.asarray(got["kernel"], np.float64), want, rtol=tol, atol=tol * np.abs(want).max())
    assert got["bias"] is params["h"]["mlp"]["c_fc"]["bias"]


def test_init_is_peft_kaiming_uniform_and_b_zero():
  cfg = _cfg("gpt2", True, n_embd=64)
  params = init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(cfg, params, rank=16)
  flat = traverse_util.flatten_dict(lora.init_adapters(spec, params, jax.random.PRNGKey(3)))
  for path, x in flat.items():
    x = np.asarray(x)
    if path[-1] == "b":
      assert not x.any()
      continue
    bound = 1.0 / np.sqrt(x.shape[-2])  # kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] weight: U(+-1/sqrt(in))
    assert x.shape[0] == cfg.n_layer and np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
    assert abs(x.std() - bound / np.sqrt(3)) < 0.1 * bound  # the uniform distribution's std
    assert not np.array_equal(x[0], x[1])  # every layer its own draw


def test_default_targets_and_bad_regexes():
  gpt, qwen = _cfg("gpt2", False), _cfg("qwen3", True)
  g = lora.select_targets(gpt, param_shapes(gpt), None)
  assert {t[-1] for t in g} == {"c_attn", "c_proj", "c_fc"} and len(g) == 4 * gpt.n_layer
  q = lora.select_targets(qwen, param_shapes(qwen), None)
  assert sorted(t[-1] for t in q) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
  assert all(t[0] == "h" for t in q)  # scanned: one stacked adapter per projection
  assert lora.select_targets(gpt, param_shapes(gpt), r"h_0/attn/c_attn") == (("h_0", "attn", "c_attn"),)
  assert lora.select_targets(gpt, param_shapes(gpt), "mlp/c_proj") == (
      ("h_0", "mlp", "c_proj"),
      ("h_1", "mlp", "c_proj"),
  )
  with pytest.raises(ValueError, match="matches no dense kernel"):
    lora.select_targets(qwen, param_shapes(qwen), "c_attn|c_proj|c_fc")  # the authors' Qwen3 script's targets
  with pytest.raises(ValueError, match="only the blocks' dense layers"):
    lora.select_targets(
        _cfg("qwen3", True, tie_embeddings=False),
        param_shapes(_cfg("qwen3", True, tie_embeddings=False)),
        "proj|lm_head",
    )


def _lora_state(family="gpt2", scan=True, rank=4):
  cfg = _cfg(family, scan, lora_dropout=0.1)
  params = init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(cfg, params, rank=rank)
  tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup=0), 10)
  return cfg, spec, tx, init_state(cfg, tx, 0, params, spec)


@pytest.mark.slow  # two train steps
def test_only_the_adapters_train_and_hold_optimizer_state():
  """Dispersion, NEFTune noise, 2 micro-batches and adapter dropout on (scanned Qwen3; GPT-2 trains in
  test_lora_train.py): the base comes out bit-identical, every adapter's A and B moved, and the optimizer moments
  are trees of the adapters only."""
  cfg, spec, tx, state = _lora_state("qwen3")
  base = jax.tree.map(np.asarray, state.frozen)
  step = jax.jit(
      functools.partial(
          train_step,
          model=build_model(cfg),
          disp=DispersionConfig(coeff=0.1, max_tokens=8),
          tx=tx,
          schedule=optax.constant_schedule(1e-2),
          grad_accum=2,
          embed_noise_alpha=5.0,
          lora_scale=spec.scale,
      )
  )
  a0 = jax.tree.map(np.asarray, state.params)
  for s in range(2):
    state, metrics = step(state, _batch(cfg.vocab_size, B=4, seed=s))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), base)
  for p, x in traverse_util.flatten_dict(state.params).items():
    assert not np.array_equal(np.asarray(x), traverse_util.flatten_dict(a0)[p]), p  # A and B both trained
  adapter_struct = jax.tree.structure(state.params)
  moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))]
  adam = [s for s in moments if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and jax.tree.structure(adam[0].mu) == jax.tree.structure(adam[0].nu) == adapter_struct
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_opt <= 2 * n_adapters + 8  # mu, nu and a few counters: nothing the size of the base


def test_lora_dropout_is_training_only_and_per_step():
  cfg, spec, tx, state = _lora_state("qwen3", scan=True)
  adapters = _random_b(state.params, jax.random.PRNGKey(5))
  model, batch = build_model(cfg), _batch(cfg.vocab_size)
  loss = lambda rng: objective(state.frozen, batch, model=model, disp=DispersionConfig(), rng=rng, adapters=adapters)
  train_loss = jax.jit(lambda rng: loss(rng)[0])
  evaluation = float(jax.jit(lambda: loss(None)[0])())  # no rng (eval_step): no dropout
  merged = build_model(dataclasses.replace(cfg, lora_dropout=0.0))
  no_dropout = jax.jit(
      lambda: objective(lora.merge(state.frozen, adapters, 1.0), batch, model=merged, disp=DispersionConfig())[0]
  )
  np.testing.assert_allclose(evaluation, float(no_dropout()), rtol=1e-6)
  a, b = float(train_loss(jax.random.PRNGKey(1))), float(train_loss(jax.random.PRNGKey(2)))
  assert a != evaluation and a != b and abs(a - evaluation) < 0.1 * evaluation


def test_adapters_are_sharded_like_their_base_weights():
  cfg = _cfg("gpt2", True)
  params = param_shapes(cfg)
  spec = _spec(cfg, params)
  tx = make_optimizer(OptimizerConfig(), 10)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  abstract, shard = state_shardings(cfg, tx, mesh, spec)
  c_attn = shard.params["h"]["attn"]["c_attn"]
  assert shard.frozen["h"]["attn"]["c_attn"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert c_attn["a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert c_attn["b"].spec == jax.sharding.PartitionSpec(None, None, "tensor")
  mu = shard.opt_state[1][0].mu  # clip, then AdamW's scale_by_adam
  assert mu["h"]["attn"]["c_attn"]["b"].spec == c_attn["b"].spec
  assert abstract.frozen["h"]["attn"]["c_attn"]["kernel"].shape == (cfg.n_layer, 32, 96)


def test_a_lora_step_compiles_without_the_base_gradient_and_moments():
  """XLA's memory analysis of the compiled step (the dry run's numbers): the arguments of full fine-tuning are the
  weights and two Adam moments, LoRA's the base weights once plus the adapters and their two moments. (Temporaries,
  gradients among them, at real sizes: docs/benchmarks.md; at this size activations dominate them.)"""
  from dispersion_jax.compile.dry_run import compile_train_step

  def compiled_memory(*overrides):
    cfg = config_lib.load("configs/gpt2_tiny.py", ["model.preset=test", "batch_size=2", "seq_len=32", *overrides])
    for key in ("n_layer", "n_embd", "n_head", "n_positions"):
      cfg.model[key] = None  # the test preset's
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    compiled, state, _ = compile_train_step(cfg, mesh)
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return (
        memory_per_device(compiled),
        size(state.frozen if state.frozen is not None else state.params),
        size(state.params),
    )

  (full, weights, _), (with_lora, base, adapters) = compiled_memory(), compiled_memory("lora.rank=4")
  assert base == weights
  predicted = full["arguments"] - 3 * weights + base + 3 * adapters
  assert abs(with_lora["arguments"] - predicted) < 0.01 * full["arguments"]


def test_fingerprint_sees_any_change_and_not_the_placement():
  params = init_params(_cfg("qwen3", True), jax.random.PRNGKey(0))
  fp = lora.fingerprint(params)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
  placed = jax.device_put(params, sharding.replicated(mesh))
  placed["h"]["mlp"]["up_proj"]["kernel"] = jax.device_put(
      params["h"]["mlp"]["up_proj"]["kernel"],
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor")),
  )
  assert lora.fingerprint_mismatch(fp, lora.fingerprint(placed)) is None
  for change in (
      lambda w: w.at[1, 3, 5].add(1e-7),
      lambda w: w[:, ::-1],  # a permutation: same sum and sum of squares
      lambda w: w.astype(jnp.bfloat16),
  ):
    other = {
        **params,
        "h": {
            **params["h"],
            "mlp": {**params["h"]["mlp"], "up_proj": {"kernel": change(params["h"]["mlp"]["up_proj"]["kernel"])}},
        },
    }
    assert lora.fingerprint_mismatch(fp, lora.fingerprint(other)) == "h/mlp/up_proj/kernel"


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=-1", "lora.rank=-1 must be >= 0"),
        ("lora.dropout=1.0", "lora.dropout=1.0 must be in"),
        ("lora.targets=c_attn(", "lora.targets='c_attn(' is not a regular expression"),
        ("lora.init_from=/nonexistent/adapter", "lora.init_from=/nonexistent/adapter: no such directory"),
    ],
)
def test_bad_lora_settings_are_one_line_config_errors(override, message):
  cfg = config_lib.load("configs/gpt2_tiny.py", [override])
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
    config_lib.validate(cfg)
  assert "\n" not in str(e.value)


def test_lora_with_active_forgetting_is_refused():
  cfg = config_lib.load(
      "configs/gpt2_tiny.py", ["lora.rank=4", "baseline.method=active_forgetting", "dispersion.coeff=0"]
  )
  with pytest.raises(ConfigError, match="LoRA freezes"):
    config_lib.validate(cfg)


@pytest.mark.parametrize(
    "path,family,n_targets",
    [("configs/midtrain_gpt2_lora.py", "gpt2", 3 * 2 + 2), ("configs/midtrain_qwen3_lora.py", "qwen3", 7 * 2)],
)
def test_the_lora_recipes_resolve_to_the_authors_settings(path, family, n_targets):
  from dispersion_jax.training import lora_state

  overrides = ["init_from=None", f"model.family={family}", "model.preset=test"]
  cfg = config_lib.load(path, overrides)
  config_lib.validate(cfg)
  model_cfg = config_lib.model_config(cfg)
  spec, adapters = lora_state.setup(cfg, model_cfg)
  assert (spec.rank, spec.alpha, spec.dropout, spec.scale, adapters) == (16, 32.0, 0.05, 2.0, None)
  assert len(spec.targets) == n_targets and model_cfg.lora_dropout == 0.05
  assert model_cfg.param_dtype == {"gpt2": "float32", "qwen3": "bfloat16"}[family]
