"""Compile-only mode: memory per device and FLOPs from abstract inputs, and a per-device memory budget."""

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import scaled
from dispersion_jax import config as config_lib
from dispersion_jax.compile import dry_run as dry_run_lib

ROOT = Path(__file__).resolve().parents[1]


def _xla_flags(flags: str, devices: int) -> str:
  kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def _tiny_cfg():
  cfg = config_lib.default_config()
  cfg.model.preset = "test"  # 2 layers, width 32, vocab 128
  cfg.seq_len, cfg.batch_size = 16, 8  # 8: divisible by the 8 CPU devices conftest asks for
  return cfg


def test_dry_run_compiles_without_params_or_data(monkeypatch, capsys):
  from dispersion_jax.data import build, loader, packed

  def no_data(*_, **__):
    raise AssertionError("the dry run must not read data")

  monkeypatch.setattr(build, "open_or_build_default", no_data)
  monkeypatch.setattr(packed, "open_identity", no_data)
  monkeypatch.setattr(loader.TrainBatches, "__init__", no_data)
  gc.collect()  # arrays earlier tests of this process left unreachable would be freed mid-run and skew the count
  before = len(jax.live_arrays())
  cfg = _tiny_cfg()
  cfg.dry_run_memory_budget_gb = 100.0
  out = dry_run_lib.dry_run(cfg)
  assert len(jax.live_arrays()) == before  # nothing materialised
  text = capsys.readouterr().out
  assert "memory per device (GiB): arguments" in text and "FLOPs per step per device" in text
  mem = out["memory_per_device"]
  assert mem["total"] > mem["arguments"] > 0 and out["fits"] is None  # local CPU: no capacity to compare with
  # XLA's count of the unscanned model is close to the 6N + attention estimate.
  assert 0.5 < out["flops_per_device"] / out["model_flops_per_device"] < 2.0


def test_memory_budget():
  from dispersion_jax.compile import dry_run_report

  def report(total, budget):
    return dict(memory_per_device={"total": total}, memory_budget_gb=budget, fits=None)

  assert dry_run_report.not_fitting_error(report(3 * 2**30, 0)) is None  # 0 = no budget
  assert dry_run_report.not_fitting_error(report(3 * 2**30, 3.0)) is None
  error = dry_run_report.not_fitting_error(report(3 * 2**30, 2.5))
  assert re.fullmatch(r"dry run: a device needs 3.00 GiB > dry_run_memory_budget_gb=2.5; shard .*", str(error))


@pytest.mark.slow
def test_gpt2_xl_on_64_simulated_devices(tmp_path):
  """The whole CLI path: GPT-2 XL (1.5B) on 8 data x 8 fsdp CPU devices, with a budget it cannot meet."""
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))
  }
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=_xla_flags(env.get("XLA_FLAGS", ""), 64))
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "dispersion_jax", "train",
          "--config",
          "configs/gpt2_xl.py",
          f"--workdir={tmp_path}",
          "--config.dry_run=True",
          "--config.dry_run_twin=False",  # the coeff-0 twin would double a minutes-long CPU compile
          "--config.mesh.data=8",
          "--config.mesh.fsdp=8",
          "--config.batch_size=64",
          "--config.grad_accum=1",  # the recipe ships grad_accum=auto; this test is about the budget of one pass
          "--config.dry_run_memory_budget_gb=2",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=scaled(300),  # a hang guard
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert "1,557.6M params (48 layers, width 1600" in r.stdout
  assert "mesh {'data': 8, 'fsdp': 8, 'tensor': 1} = 64 cpu devices" in r.stdout
  mem = dict(re.findall(r"(arguments|outputs|temp|total) ([\d.]+)", r.stdout))
  assert set(mem) == {"arguments", "outputs", "temp", "total"}, r.stdout
  # fp32 params + Adam moments, sharded 8 ways by fsdp (replicated over data): 1.56e9 * 12 B / 8 per device.
  assert abs(float(mem["arguments"]) - 1.5576e9 * 12 / 8 / 2**30) < 0.1
  assert float(mem["total"]) > 2
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "dry_run_memory_budget_gb=2;" in errors[0], r.stderr[-3000:]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.slow
def test_qwen3_8b_on_64_simulated_devices(tmp_path):
  """Qwen3-8B (untied, GQA 32:8) compiles for 8 data x 8 fsdp devices and reports its memory per device."""
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))
  }
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=_xla_flags(env.get("XLA_FLAGS", ""), 64))
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "dispersion_jax", "train",
          "--config",
          "configs/pretrain_qwen3.py",
          f"--workdir={tmp_path}",
          "--config.model.preset=qwen3-8b",
          "--config.dry_run=True",
          "--config.dry_run_twin=False",  # the coeff-0 twin would double a minutes-long CPU compile
          "--config.mesh.data=8",
          "--config.mesh.fsdp=8",
          "--config.batch_size=64",
          "--config.grad_accum=1",
          "--config.seq_len=1024",
          "--config.model.remat=full",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=scaled(300),  # a hang guard
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "8,190.7M params (36 layers, width 4096" in r.stdout
  mem = dict(re.findall(r"(arguments|outputs|temp|total) ([\d.]+)", r.stdout))
  # fp32 params + Adam moments sharded 8 ways by fsdp: 8.19e9 * 12 B / 8 per device.
  assert abs(float(mem["arguments"]) - 8.1907e9 * 12 / 8 / 2**30) < 0.2 and float(mem["total"]) > float(
      mem["arguments"]
  )
