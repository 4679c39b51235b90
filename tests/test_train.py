"""The training job: exact resume, mesh independence, grad accumulation, mid-training, failures that lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models: deselect with -m 'not slow'

from dispersion_jax import config as config_lib
from dispersion_jax import train
from dispersion_jax.checkpoint import CheckpointError
from dispersion_jax.checkpoint import Checkpointer
from dispersion_jax.cli.train import main as train_main
from dispersion_jax.errors import TrainingError
from dispersion_jax.models import GPT, build_model
from dispersion_jax.optim import lr_schedule, make_optimizer
from dispersion_jax.train_step import init_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.n_layer=2",
    "--config.model.n_embd=32",
    "--config.model.n_head=4",
    "--config.model.n_positions=32",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.eval_every=0",
    "--config.log_every=1",
    "--config.optimizer.lr=3e-3",
]


@pytest.fixture(scope="module")
def data_dir(corpus_dir):
  return corpus_dir


def tiny_cfg(data_dir: str, *overrides: str):
  flags = [*TINY, f"--config.data.data_dir={data_dir}", *overrides]
  return config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), [f.removeprefix("--config.") for f in flags])


def optimizer(cfg):
  """The run's optimizer and schedule, as train.run builds them."""
  opt, steps = config_lib.optimizer_config(cfg), config_lib.loop_config(cfg).steps
  return make_optimizer(opt, steps), lr_schedule(opt, steps)


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact_bit_for_bit(tmp_path, data_dir):
  cfg = tiny_cfg(data_dir, "--config.steps=6", "--config.checkpoint_every=3", "--config.dispersion.max_tokens=16")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert train.run(cfg, straight) == 6
  assert train.run(cfg, resumed, stop_at=3) == 3  # stops like a preemption: checkpoint at 3
  assert train.run(cfg, resumed) == 6
  a, b = losses(straight), losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert a == b  # exact float equality: same params, optimizer state, RNG and data order after the restore


QWEN3_TINY = [
    "--config.model.n_layer=2",
    "--config.model.n_embd=32",
    "--config.model.n_head=4",
    "--config.model.n_kv_head=2",
    "--config.model.head_dim=16",
    "--config.model.n_inner=64",
    "--config.model.n_positions=32",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.eval_every=0",
    "--config.log_every=1",
    "--config.optimizer.lr=3e-3",
]


def test_qwen3_demo_config_trains_and_resumes_bit_for_bit(tmp_path, data_dir):
  flags = [
      *QWEN3_TINY,
      f"--config.data.data_dir={data_dir}",
      "--config.steps=6",
      "--config.checkpoint_every=3",
      "--config.dispersion.max_tokens=16",
  ]
  cfg = config_lib.load(os.path.join(REPO, "configs/qwen3_tiny.py"), [f.removeprefix("--config.") for f in flags])
  assert type(config_lib.model_config(cfg)).__name__ == "Qwen3Config"
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert train.run(cfg, straight) == 6
  assert train.run(cfg, resumed, stop_at=3) == 3
  assert train.run(cfg, resumed) == 6
  a, b = losses(straight), losses(resumed)
  assert sorted(a) == [1, 2, 3, 4, 5, 6] and a == b
  assert a[6] < a[1]  # it learns


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


def test_one_device_a_4x2_mesh_and_a_resharded_resume_give_the_same_losses(tmp_path, data_dir):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
  base = ["--config.steps=4", "--config.checkpoint_every=2"]
  one = str(tmp_path / "one")
  train.run(tiny_cfg(data_dir, *base, "--config.mesh.data=1"), one, devices=jax.devices()[:1])
  mesh_4x2 = tiny_cfg(data_dir, *base, "--config.mesh.data=4", "--config.mesh.fsdp=2")
  train.run(mesh_4x2, str(tmp_path / "4x2"))
  # Written on a 4x2 (data, fsdp) mesh, restored onto a 2x2x2 (data, fsdp, tensor) mesh.
  resharded = str(tmp_path / "resharded")
  train.run(mesh_4x2, resharded, stop_at=2)
  train.run(
      tiny_cfg(data_dir, *base, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), resharded
  )
  want = losses(one)
  assert sorted(want) == [1, 2, 3, 4]
  for name in ("4x2", "resharded"):
    got = losses(str(tmp_path / name))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5, err_msg=name)


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
  assert "another model shape" in _main_error(capsys, base + ["--config.model.n_embd=64", "--config.steps=4"])
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


def _spawn(workdir: str, data_dir: str, *extra: str) -> subprocess.Popen:
  cmd = [
      sys.executable,
      "-m",
      "dispersion_jax.train",
      "--config",
      "configs/gpt2_tiny.py",
      "--workdir",
      workdir,
      *TINY,
      f"--config.data.data_dir={data_dir}",
      *extra,
  ]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir: str, proc: subprocess.Popen, timeout: float = 240) -> None:
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.kill()
  raise AssertionError("no checkpoint appeared")


def test_kill_9_then_rerun_continues_from_the_last_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "killed")
  args = ("--config.steps=400", "--config.checkpoint_every=2")
  proc = _spawn(workdir, data_dir, *args)
  _wait_for_checkpoint(workdir, proc)
  time.sleep(1.0)  # land somewhere in the middle of later steps and saves
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  last = Checkpointer(workdir).latest_step()
  assert last is not None and last >= 2
  proc = _spawn(workdir, data_dir, "--config.steps=" + str(last + 2), "--config.checkpoint_every=2")
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert f"resuming from step {last}" in out


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  workdir = str(tmp_path / "preempted")
  proc = _spawn(workdir, data_dir, "--config.steps=100000", "--config.checkpoint_every=1000")
  deadline = time.time() + 240
  jsonl = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(jsonl) and os.path.getsize(jsonl) > 0) and time.time() < deadline:  # training steps
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted at step" in out
  step = int(out.split("preempted at step ")[1].split(":")[0])
  assert Checkpointer(workdir).latest_step() == step > 0


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
    train.load_params("/nonexistent-workdir")


def test_checkpoints_of_the_grain_pipeline_and_a_new_batch_size_resume_at_the_right_row(tmp_path, data_dir):
  """A checkpoint of the earlier version (a Grain iterator item instead of the data position) resumes at step x
  its batch; a resumed run with another global batch continues from the rows consumed so far."""
  import grain
  import orbax.checkpoint as ocp

  cfg = tiny_cfg(data_dir, "--config.steps=4", "--config.checkpoint_every=2")
  model_cfg = config_lib.model_config(cfg)
  tx, _ = optimizer(cfg)
  old_cfg = cfg.to_dict()
  old_cfg["data"].update(worker_count=0, shards=0)  # keys of the old schema
  old_cfg["dispersion"]["ce_chunk"] = None
  old = ocp.CheckpointManager(
      str(tmp_path / "w" / "checkpoints"),
      item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(),
      },
  )
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(it)
  old.save(
      2,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(init_state(model_cfg, tx, 0)),
          config=ocp.args.JsonSave(old_cfg),
          data=grain.checkpoint.CheckpointSave(it),
      ),
  )
  old.wait_until_finished()
  old.close()
  assert train.run(cfg, str(tmp_path / "w")) == 4
  assert Checkpointer(str(tmp_path / "w")).data_state(4)["rows_consumed"] == 4 * 8  # 2 x 8 (legacy) + 2 x 8
  bigger = tiny_cfg(data_dir, "--config.steps=6", "--config.checkpoint_every=2", "--config.batch_size=16")
  assert train.run(bigger, str(tmp_path / "w")) == 6
  assert Checkpointer(str(tmp_path / "w")).data_state(6)["rows_consumed"] == 4 * 8 + 2 * 16
