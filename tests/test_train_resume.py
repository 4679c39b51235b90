"""Resuming the training job: bit for bit after a stop (GPT-2 and the Qwen3 demo), the same losses on one device,
a 4x2 mesh and a resharded resume, after kill -9 and SIGTERM, and from checkpoints of the earlier data pipeline or
with a new batch size. The rest of the training job: tests/test_train.py."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models: deselect with -m 'not slow'

from dispersion_jax import config as config_lib
from dispersion_jax.training import train
from dispersion_jax.training.checkpoint import Checkpointer
from dispersion_jax.training.train_step import init_state

from command_helpers import ctrl_c_as_in_a_terminal
from conftest import REPO, TINY, optimizer, scaled, tiny_cfg


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


QWEN3_TINY = [*TINY, "--config.model.n_kv_head=2", "--config.model.head_dim=16", "--config.model.n_inner=64"]


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


def _spawn(workdir: str, data_dir: str, *extra: str) -> subprocess.Popen:
  cmd = [
      sys.executable,
      "-m",
      "dispersion_jax", "train",
      "--config",
      "configs/gpt2_tiny.py",
      "--workdir",
      workdir,
      *TINY,
      f"--config.data.data_dir={data_dir}",
      *extra,
  ]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.Popen(
      cmd,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      preexec_fn=ctrl_c_as_in_a_terminal,  # the SIGINT test's Ctrl-C reaches it
  )


def _wait_for_checkpoint(workdir: str, proc: subprocess.Popen, timeout: float = 240) -> None:
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + scaled(timeout)  # a hang guard
  while time.monotonic() < deadline:
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
  # Land somewhere in the middle of later steps and saves. Any point will do (a checkpoint exists, and 400 steps
  # outlast the second): the assertions below hold wherever the kill lands.
  time.sleep(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=scaled(30))
  last = Checkpointer.reader(workdir).latest_step()
  assert last is not None and last >= 2
  proc = _spawn(workdir, data_dir, "--config.steps=" + str(last + 2), "--config.checkpoint_every=2")
  out, _ = proc.communicate(timeout=scaled(240))
  assert proc.returncode == 0, out
  assert f"resuming from step {last}" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_exits_75(tmp_path, data_dir, sig):
  """A preemption (SIGTERM) or Ctrl-C: a checkpoint at the next step, then exit code 75 (a scheduler re-queues on
  it; 0 would read as finished)."""
  workdir = str(tmp_path / "preempted")
  proc = _spawn(workdir, data_dir, "--config.steps=100000", "--config.checkpoint_every=1000")
  deadline = time.monotonic() + scaled(240)  # a hang guard; 100000 steps cannot finish before the signal
  jsonl = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(jsonl) and os.path.getsize(jsonl) > 0) and time.monotonic() < deadline:  # steps
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=scaled(120))
  assert proc.returncode == 75, out
  assert "preempted at step" in out and "Traceback" not in out, out
  step = int(out.split("preempted at step ")[1].split(":")[0])
  assert Checkpointer.reader(workdir).latest_step() == step > 0


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
