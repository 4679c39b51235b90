"""The multi-process setup without processes: the launch flags, jax.distributed.initialize from flags, environment
and SLURM, the hybrid mesh over hosts, and the config hash the processes compare. The runs: tests/test_distributed.py.
"""

import os
from types import SimpleNamespace

import pytest

from dispersion_jax.parallel import distributed, sharding

# The marks of test_distributed.py, whose half these tests were: `-m 'not slow'` selects the same tests as before.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_launch_flags(capsys):
  from dispersion_jax.cli.train import parser

  args = parser().parse_args(
      [
          "--config",
          "c.py",
          "--coordinator",
          "h:1234",
          "--num_processes=4",
          "--config.seed=1",
          "--process_id",
          "3",
          "--workdir=w",
      ]
  )
  assert (args.config, args.workdir, args.overrides) == ("c.py", "w", [("seed", "1")])
  assert distributed.Launch(args.coordinator, args.num_processes, args.process_id) == distributed.Launch("h:1234", 4, 3)
  with pytest.raises(SystemExit) as e:
    parser().parse_args(["--config", "c.py", "--workdir", "w", "--num_processes=two"])
  assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_initialize_reads_flags_then_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_backend_started", lambda: False)
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
  for k in [k for k in os.environ if k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))]:
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False and not calls  # a plain single-process run
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "env:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  monkeypatch.setenv("DISPERSION_HEARTBEAT_TIMEOUT_S", "7")
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "local_device_count", lambda: 1)
  monkeypatch.setattr(distributed.jax, "device_count", lambda: 2)
  assert distributed.initialize(distributed.Launch(process_id=0)) is True
  assert calls[-1]["coordinator_address"] == "env:1" and calls[-1]["num_processes"] == 2
  assert calls[-1]["process_id"] == 0 and calls[-1]["heartbeat_timeout_seconds"] == 7
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  for k, v in dict(SLURM_JOB_ID="9", SLURM_STEP_NODELIST="n[1-4]", SLURM_PROCID="2", SLURM_LOCALID="0").items():
    monkeypatch.setenv(k, v)
  assert distributed.initialize() is False  # an srun step of one task
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.initialize() is True and calls[-1]["coordinator_address"] is None  # jax reads SLURM
  monkeypatch.setattr(distributed, "_backend_started", lambda: True)
  with pytest.raises(RuntimeError, match="before anything touches"):
    distributed.initialize()


def test_dcn_split_keeps_fsdp_and_tensor_inside_hosts():
  assert sharding.dcn_split((8, 8, 1), 8) == ((1, 8, 1), (8, 1, 1))
  assert sharding.dcn_split((2, 4, 1), 2) == ((1, 4, 1), (2, 1, 1))
  assert sharding.dcn_split((4, 4, 2), 2) == ((2, 4, 2), (2, 1, 1))
  assert sharding.dcn_split((1, 16, 1), 2) == ((1, 8, 1), (1, 2, 1))  # data too small: fsdp crosses
  with pytest.raises(ValueError, match="multiple of 4"):
    sharding.dcn_split((1, 1, 8), 4)


def _fake_devices(n: int, per_process: int, platform: str = "cpu") -> list:
  return [SimpleNamespace(id=i, process_index=i // per_process, platform=platform) for i in range(n)]


def test_hybrid_mesh_puts_each_host_in_one_data_slice():
  mesh = sharding.hybrid_device_mesh((2, 4, 1), _fake_devices(8, 4))  # CPU: a process stands for a host
  assert mesh.shape == (2, 4, 1)
  assert [{d.process_index for d in mesh[i].flat} for i in range(2)] == [{0}, {1}]
  mesh = sharding.hybrid_device_mesh((4, 2, 2), _fake_devices(16, 4))
  assert all(len({d.process_index for d in mesh[i].flat}) == 1 for i in range(4))  # fsdp x tensor in a host


def test_gpu_hosts_group_processes_of_one_machine(monkeypatch):
  # 2 machines x 4 GPUs, one process per GPU: the fsdp groups of 4 must each be one machine, not one process.
  monkeypatch.setattr(sharding, "_process_hosts", lambda: [11, 11, 11, 11, 22, 22, 22, 22])
  devices = _fake_devices(8, 1, "gpu")
  assert sharding.granule_ids(devices) == [11] * 4 + [22] * 4
  mesh = sharding.hybrid_device_mesh((2, 4, 1), devices)
  assert [sorted(d.process_index for d in mesh[i].flat) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_config_hash_tells_configs_apart():
  from dispersion_jax.config import default_config

  a, b = default_config(), default_config()
  assert distributed.config_hash(a.to_dict()) == distributed.config_hash(b.to_dict())
  b.seed = 1
  assert distributed.config_hash(a.to_dict()) != distributed.config_hash(b.to_dict())
