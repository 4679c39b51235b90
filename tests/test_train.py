"""The training job: grad accumulation, mid-training, failures that lose nothing, the shipped configs. Resuming
(exact, mesh-independent, after kill -9 or SIGTERM, from older checkpoints): tests/test_train_resume.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models: deselect with -m 'not slow'

from dispersion_jax import config as config_lib
from dispersion_jax.cli.train import main as train_main
from dispersion_jax.errors import TrainingError
from dispersion_jax.models import GPT, build_model
from dispersion_jax.training import saved_run, train
from dispersion_jax.training.checkpoint import Checkpointer, CheckpointError
from dispersion_jax.training.train_step import init_state, train_step

from conftest import REPO, TINY, optimizer, tiny_cfg


def test_mid_training_from_hf_qwen3_starts_at_the_hf_loss(golden_dir, data_dir):
  path = os.path.join(golden_dir, "qwen3_tiny")
  ref = dict(np.load(os.path.join(golden_dir, "qwen3_tiny_reference.npz")))
  flags = [
      f"--config.init_from={path}",
      f"--config.data.data_dir={data_dir}",
      "--config.dispersion.coeff=0.1",
      "--config.dispersion.clamp_threshold=0.25",
      "--config.dispersion.max_tokens=None",
      "--config.dispersion.block_size=None",
      "--config.grad_accum=1",
      "--config.model.remat=none",
  ]
  cfg = config_lib.load(os.path.join(REPO, "configs/midtrain_qwen3.py"), [f.removeprefix("--config.") for f in flags])
  assert cfg.tokenizer == path  # the recipe's tokenizer follows init_from
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  assert (type(model_cfg).__name__, model_cfg.n_layer, model_cfg.vocab_size) == ("Qwen3Config", 3, 512)
  tx, schedule = optimizer(cfg)
  state = init_state(model_cfg, tx, cfg.seed, train.pretrained_params(cfg, model_cfg))
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  batch = dict(input_ids=ids, targets=jnp.roll(ids, -1, 1), loss_mask=jnp.ones(ids.shape).at[:, -1].set(0))
  _, metrics = jax.jit(
      lambda s, b: train_step(s, b, model=build_model(model_cfg), disp=disp, tx=tx, schedule=schedule, grad_accum=1)
  )(state, batch)
  np.testing.assert_allclose(metrics["ce"], ref["objective/ce"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref["objective/total"], rtol=1e-5)


def test_grad_accumulation_keeps_the_meaning_of_coeff(data_dir):
  cfg = tiny_cfg(data_dir, "--config.dispersion.coeff=1.0")
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  tx, schedule = optimizer(cfg)
  state = init_state(model_cfg, tx, 0)
  ids = jax.random.randint(jax.random.PRNGKey(0), (8, 32), 0, model_cfg.vocab_size)
  batch = dict(input_ids=ids, targets=jnp.roll(ids, -1, 1))
  out = {}
  for k in (1, 2, 4):
    step = jax.jit(
        lambda s, b, k=k: train_step(s, b, model=GPT(model_cfg), disp=disp, tx=tx, schedule=schedule, grad_accum=k)
    )
    out[k] = step(state, batch)
  for k in (2, 4):
    for key in ("loss", "ce", "dispersion", "grad_norm"):
      np.testing.assert_allclose(out[k][1][key], out[1][1][key], rtol=2e-5, err_msg=f"grad_accum={k} {key}")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[k][0].params, out[1][0].params
    )


def test_mid_training_from_hf_starts_at_the_hf_loss(gpt2_golden, data_dir):
  path, ref = gpt2_golden
  cfg = tiny_cfg(
      data_dir,
      f"--config.init_from={path}",
      "--config.model.n_layer=None",
      "--config.model.n_embd=None",
      "--config.model.n_head=None",
      "--config.model.n_positions=None",
      "--config.dispersion.coeff=0.1",
      "--config.dispersion.clamp_threshold=0.1",
      "--config.dispersion.loc=all",
  )
  model_cfg, disp = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  assert (model_cfg.n_layer, model_cfg.vocab_size) == (3, 512)
  tx, schedule = optimizer(cfg)
  state = init_state(model_cfg, tx, cfg.seed, train.pretrained_params(cfg, model_cfg))
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  batch = dict(input_ids=ids, targets=jnp.roll(ids, -1, 1), loss_mask=jnp.ones(ids.shape).at[:, -1].set(0))
  _, metrics = jax.jit(
      lambda s, b: train_step(s, b, model=GPT(model_cfg), disp=disp, tx=tx, schedule=schedule, grad_accum=1)
  )(state, batch)
  np.testing.assert_allclose(metrics["ce"], ref["objective/ce"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref["objective/total"], rtol=1e-5)


def _main_error(capsys, argv) -> str:
  capsys.readouterr()  # drop what earlier runs printed
  with pytest.raises(SystemExit) as exit_info:
    train_main(argv)
  assert exit_info.value.code == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  errors = [line for line in err if line.startswith("error: ")]
  assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "".join(err), err
  return errors[0]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, data_dir):
  base = [
      "--config",
      os.path.join(REPO, "configs/gpt2_tiny.py"),
      "--workdir",
      str(tmp_path / "w"),
      *TINY,
      f"--config.data.data_dir={data_dir}",
      "--config.steps=2",
      "--config.checkpoint_every=2",
  ]
  assert "dispersion.coef" in _main_error(capsys, base + ["--config.dispersion.coef=0.1"])
  assert "optimizer.lr" in _main_error(capsys, base + ["--config.optimizer.lr=fast"])
  assert (
      "data-parallel" in _main_error(capsys, base + ["--config.batch_size=6", "--config.mesh.data=-1"])
      or jax.device_count() == 1
  )
  assert "text_dir" in _main_error(
      capsys, base + ["--config.data.source=text_dir", f"--config.data.text_dir={tmp_path / 'missing'}"]
  )
  # A finished run, then a checkpoint of another model shape in the same workdir.
  train_main(base)
  msg = _main_error(capsys, base + ["--config.model.n_embd=64", "--config.steps=4"])
  assert "model.n_embd (checkpoint 32, now 64)" in msg and "--config.model.n_embd=32" in msg
  # A corrupt checkpoint: overwrite every file of the latest step with garbage.
  step_dir = tmp_path / "w" / "checkpoints" / "2"
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  msg = _main_error(capsys, base + ["--config.steps=4"])
  assert "checkpoint" in msg and "new --workdir" in msg


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  cfg = tiny_cfg(
      data_dir,
      "--config.steps=6",
      "--config.checkpoint_every=2",
      "--config.optimizer.clip=0",
      "--config.optimizer.warmup=0",
  )
  workdir = str(tmp_path / "nan")
  train.run(cfg, workdir, stop_at=2)
  cfg.optimizer.lr = float("inf")  # the next update makes every parameter non-finite
  with pytest.raises(TrainingError, match=r"non-finite loss .* at step 4; the last good checkpoint is step 2"):
    train.run(cfg, workdir)
  assert Checkpointer(workdir).latest_step() == 2


def test_every_shipped_config_loads_and_validates(gpt2_golden, golden_dir):
  configs = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  assert {
      "gpt2_tiny.py",
      "gpt2_small.py",
      "gpt2_medium.py",
      "gpt2_large.py",
      "gpt2_xl.py",
      "midtrain_gpt2.py",
      "qwen3_tiny.py",
      "midtrain_qwen3.py",
      "pretrain_qwen3.py",
  } <= set(configs)
  placeholders = {"gpt2": gpt2_golden[0], "Qwen/Qwen3-0.6B": os.path.join(golden_dir, "qwen3_tiny")}
  for f in configs:
    cfg = config_lib.load_config(os.path.join(REPO, "configs", f))
    if cfg.init_from:
      with pytest.raises(config_lib.ConfigError, match=f"init_from={cfg.init_from}: no such directory"):
        config_lib.validate(cfg)
      cfg.init_from = placeholders[cfg.init_from]
    config_lib.validate(cfg)
    config_lib.model_config(cfg)
  midtrain = config_lib.load_config(os.path.join(REPO, "configs", "midtrain_gpt2.py"))
  assert midtrain.batch_size * midtrain.seq_len == 131072 and midtrain.dispersion.clamp_threshold == 0.1


def test_config_errors_name_the_key():
  cfg = config_lib.default_config()
  for key, text, match in (
      ("optimizer.lrr", "1", "unknown config key 'optimizer.lrr'"),
      ("steps", "1.5", "steps=1.5: expected a int"),
      ("model.scan_layers", "maybe", "expected true or false"),
  ):
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.apply_override(cfg, key, text)
  config_lib.apply_override(cfg, "dispersion.max_tokens", "256")
  config_lib.apply_override(cfg, "optimizer.lr", "1")
  assert cfg.dispersion.max_tokens == 256 and cfg.optimizer.lr == 1.0
  cfg.grad_accum = 3
  with pytest.raises(config_lib.ConfigError, match="batch_size=32 must be divisible by grad_accum=3"):
    config_lib.validate(cfg)
  with pytest.raises(CheckpointError):
    saved_run.load_params("/nonexistent-workdir")
