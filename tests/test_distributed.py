"""Multi-process training on CPU: real OS processes on loopback, joined by JAX's multi-controller runtime (gloo).

One chain of runs (module fixture), each check a test: two processes x 4 devices train the tiny model and are cut
short by killing one process; the other must exit within a bounded time; re-running (launch/local.sh) resumes from
the last checkpoint, bit for bit like an uninterrupted 2 x 4 run; the same checkpoint also resumes on 1 process x
2 devices and on 4 processes x 2 devices; all losses equal those of one process x 8 devices; the last checkpoint
(written by 2 x 4) restores exactly in 1 x 8 and 1 x 2 devices.
The setup without processes (flags, initialize, hybrid mesh, config hash): tests/test_distributed_setup.py.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import scaled

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # real processes: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "dispersion_jax", "train"]
# Constant learning rate (no warmup, no decay): `steps` only says where to stop, so runs of different lengths agree.
TINY = [
    "--config",
    "configs/gpt2_tiny.py",
    "--config.model.n_layer=2",
    "--config.model.n_embd=32",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.eval_every=0",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.optimizer.warmup=0",
    "--config.optimizer.min_lr_ratio=1.0",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
]  # fsdp inside a process, data across the two
HEARTBEAT_S = 10
# The feature under test: a killed peer stops the others within the heartbeat timeout plus the time to notice and
# exit. The bound does not scale (conftest.scaled is for hang guards only): 60 s = the 10 s timeout + a 50 s margin
# for a loaded 2-core machine (the test prints the measured time).
EXIT_BOUND_S = 60
# launch/local.sh stops the other processes as soon as one fails: they would otherwise sleep 60 s. The stop itself
# is a kill; 15 s leaves a margin for starting bash three times on a loaded machine, well apart from the 60 s of a
# launcher that waited.
LOCAL_SH_STOP_BOUND_S = 15


def _env(devices: int, rank: tuple[int, int, int] | None = None) -> dict:
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER"))
  }
  env.update(
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      PYTHONPATH=str(ROOT),
      XLA_FLAGS=_xla_flags(env, devices),
      DISPERSION_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
      DISPERSION_INIT_TIMEOUT_S=str(int(scaled(120))),
  )
  if rank:
    port, n, i = rank
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
  return env


def _xla_flags(env: dict, devices: int) -> str:
  """The environment's XLA_FLAGS with our device count instead of any other (conftest sets one)."""
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
  with open(log, "w") as fh:  # a file, not a pipe: a chatty child never blocks on a full pipe
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _run(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
  """`timeout`: a hang guard, scaled by DISPERSION_TEST_TIME_SCALE."""
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled(timeout))


def _steps(workdir: Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def _metrics(workdir: Path) -> dict[int, dict]:
  """Step -> merged metrics (a resumed run may log a step twice; the values must agree, checked elsewhere)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row["step"], []).append(row)
  return out


def _stop(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


# Restores the latest checkpoint of argv[1] onto a mesh over all local devices (fsdp = every device), and reads
# it again as plain numpy arrays (no sharding at all): both go to argv[2].
_RESTORE = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp
from dispersion_jax.parallel import sharding
from dispersion_jax.training import saved_run
from dispersion_jax.training.checkpoint import Checkpointer
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
_, _, state = saved_run.load_run(sys.argv[1], mesh=mesh)
ckpt = Checkpointer(sys.argv[1], max_to_keep=None, async_save=False)
step = ckpt.latest_step()
meta = ckpt.manager.item_metadata(step)["state"]
disk = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
    jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta))))["state"]
out = {}
for prefix, tree in (("restored", state), ("disk", disk)):
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + "/" + jax.tree_util.keystr(path, simple=True, separator="/")] = np.asarray(jax.device_get(x))
sharded = sum(1 for x in jax.tree.leaves(state.params) if len(x.sharding.device_set) > 1 and
              not x.sharding.is_fully_replicated)
np.savez(sys.argv[2], **out)
print(f"restored step {step} on {jax.device_count()} devices, {sharded} sharded param leaves")
ckpt.close()
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  d = tmp_path_factory.mktemp("distributed")
  work, ref = d / "mp", d / "ref"
  # 1. Two processes x 4 devices, one killed once the first checkpoint exists.
  port = _free_port()
  procs = [
      _spawn([*TRAIN, *TINY, "--config.steps=200", f"--workdir={work}"], _env(4, (port, 2, i)), d / f"killed_{i}.log")
      for i in range(2)
  ]
  try:
    deadline = time.monotonic() + scaled(240)  # a hang guard: the first checkpoint comes after 2 steps
    while not _steps(work):
      assert time.monotonic() < deadline, "hang guard: no checkpoint after scaled(240) s"
      assert all(p.poll() is None for p in procs), (d / "killed_0.log").read_text()[-3000:]
      time.sleep(0.2)
    procs[1].kill()
    t0 = time.monotonic()
    try:
      procs[0].wait(timeout=EXIT_BOUND_S + 30)
      exit_s = time.monotonic() - t0
    except subprocess.TimeoutExpired:
      exit_s = None
  finally:
    _stop(procs)
  last = max(_steps(work))
  killed = SimpleNamespace(
      rc=procs[0].returncode, seconds=exit_s, checkpoint=last, log=(d / "killed_0.log").read_text(errors="replace")
  )
  final = last + 2
  tail = [f"--config.steps={final}", f"--config.eval_every={final}", "--config.eval_batches=1"]
  # Copies of the killed run's workdir, resumed on other topologies below.
  other = {n: d / f"mp_{n}" for n in ("1x2", "4x2")}
  for w in other.values():
    shutil.copytree(work, w)
  # 2. Re-run the same command through launch/local.sh: resumes from `last`, evaluates at the end.
  resumed = _run(
      ["bash", "launch/local.sh", "2", *TINY, *tail, f"--workdir={work}"],
      {**_env(1), "LOCAL_DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
      timeout=300,
  )
  # 3. The references: one process x 8 devices (same global mesh), and two processes x 4 uninterrupted.
  # Two steps more: the killed run may have logged a step or two past its last checkpoint.
  reference = _run([*TRAIN, *TINY, *tail, f"--config.steps={final + 2}", f"--workdir={ref}"], _env(8), timeout=300)
  straight = _run(
      ["bash", "launch/local.sh", "2", *TINY, *tail, f"--workdir={d / 'straight'}"],
      {**_env(1), "LOCAL_DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
      timeout=300,
  )
  # 4. The 2 x 4 checkpoint resumed on 1 process x 2 devices (another mesh) and on 4 processes x 2 devices.
  on_1x2 = _run(
      [*TRAIN, *TINY, *tail, "--config.mesh.data=1", "--config.mesh.fsdp=2", f"--workdir={other['1x2']}"],
      _env(2),
      timeout=300,
  )
  on_4x2 = _run(
      ["bash", "launch/local.sh", "4", *TINY, *tail, f"--workdir={other['4x2']}"],
      {**_env(1), "LOCAL_DEVICES_PER_PROCESS": "2", "PYTHON": sys.executable},
      timeout=300,
  )
  # 4. The 2 x 4 checkpoint restored in 1 x 8 and 1 x 2 devices (in parallel: two cores).
  restores = {
      n: subprocess.Popen(
          [sys.executable, "-c", _RESTORE, str(work), str(d / f"restore_{n}.npz")],
          cwd=ROOT,
          env=_env(n),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for n in (8, 2)
  }
  try:
    restored = {n: (p.communicate(timeout=scaled(240))[0], p.returncode) for n, p in restores.items()}
  finally:
    _stop(list(restores.values()))
  return SimpleNamespace(
      dir=d,
      work=work,
      ref=ref,
      killed=killed,
      resumed=resumed,
      reference=reference,
      straight=(straight, d / "straight"),
      other={"1x2": (on_1x2, other["1x2"]), "4x2": (on_4x2, other["4x2"])},
      final=final,
      restored=restored,
  )


def test_killed_process_stops_the_others_within_a_bounded_time(chain):
  k = chain.killed
  assert k.seconds is not None, f"the surviving process was still running {EXIT_BOUND_S + 30} s after the kill"
  print(f"the surviving process exited {k.seconds:.1f} s after the kill (heartbeat timeout {HEARTBEAT_S} s)")
  assert k.seconds < EXIT_BOUND_S, k.seconds
  assert k.rc != 0
  # The peer's death reaches the survivor as a heartbeat timeout, or, when the kill lands inside a collective, as
  # gloo's broken transfer (a partial message from the closed socket); either way it stops within the bound.
  heartbeat = "another task died" in k.log and "stopped sending heartbeats" in k.log
  broken_collective = "Received data size doesn't match expected size" in k.log
  assert heartbeat or broken_collective, k.log[-3000:]


def test_rerun_resumes_from_the_last_checkpoint(chain):
  out = chain.resumed.stdout + chain.resumed.stderr
  assert chain.resumed.returncode == 0, out[-4000:]
  assert f"resuming from step {chain.killed.checkpoint}" in out, out[-4000:]
  assert "[1] " in out  # local.sh prefixes each process's lines
  assert chain.final in _steps(chain.work)


def test_two_processes_give_the_losses_of_one(chain):
  assert chain.reference.returncode == 0, chain.reference.stderr[-4000:]
  mp, one = _metrics(chain.work), _metrics(chain.ref)
  assert set(range(1, chain.final + 1)) <= set(mp) <= set(one), (sorted(mp), sorted(one))
  for step, rows in mp.items():
    want = next(r for r in one[step] if "loss" in r)
    for row in (r for r in rows if "loss" in r):  # the killed and the resumed run may both log a step
      np.testing.assert_allclose(row["loss"], want["loss"], rtol=1e-5, err_msg=f"step {step}")
      np.testing.assert_allclose(row["dispersion"], want["dispersion"], rtol=1e-4, atol=1e-6)
  val_mp = next(r for r in mp[chain.final] if "val_loss" in r)
  val_one = next(r for r in one[chain.final] if "val_loss" in r)
  np.testing.assert_allclose(val_mp["val_loss"], val_one["val_loss"], rtol=1e-5)  # reduced across processes


def test_resume_on_the_same_topology_is_bit_for_bit(chain):
  run, workdir = chain.straight
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  straight, resumed = _metrics(workdir), _metrics(chain.work)
  for step in range(chain.killed.checkpoint + 1, chain.final + 1):
    want = next(r for r in straight[step] if "loss" in r)
    got = next(r for r in resumed[step][::-1] if "loss" in r)  # the resumed run's row (logged last)
    assert got["loss"] == want["loss"] and got["ce"] == want["ce"], step


@pytest.mark.parametrize("topology", ["1x2", "4x2"])
def test_checkpoint_of_2x4_resumes_on_another_process_count(chain, topology):
  run, workdir = chain.other[topology]
  out = run.stdout + run.stderr
  assert run.returncode == 0, out[-4000:]
  assert f"resuming from step {chain.killed.checkpoint}" in out, out[-4000:]
  got, one = _metrics(workdir), _metrics(chain.ref)
  for step in range(chain.killed.checkpoint + 1, chain.final + 1):
    row = next(r for r in got[step][::-1] if "loss" in r)
    want = next(r for r in one[step] if "loss" in r)
    np.testing.assert_allclose(row["loss"], want["loss"], rtol=2e-5, err_msg=f"{topology} step {step}")
  val = next(r for r in got[chain.final] if "val_loss" in r)
  val_one = next(r for r in one[chain.final] if "val_loss" in r)
  np.testing.assert_allclose(val["val_loss"], val_one["val_loss"], rtol=2e-5)  # the same validation batches


def test_checkpoint_of_two_processes_restores_exactly_on_one(chain):
  arrays = {}
  for n, (out, rc) in chain.restored.items():
    assert rc == 0, out[-4000:]
    assert f"on {n} devices" in out and " 0 sharded" not in out, out[-2000:]
    arrays[n] = dict(np.load(chain.dir / f"restore_{n}.npz"))
  disk = {k[len("disk/") :]: v for k, v in arrays[8].items() if k.startswith("disk/")}
  assert any(k.startswith("params/") for k in disk) and len(disk) > 20
  for n, a in arrays.items():
    for key, want in disk.items():
      got = a[f"restored/{key}"]
      assert got.dtype == want.dtype and got.shape == want.shape, key
      np.testing.assert_array_equal(got, want, err_msg=f"{key} restored on {n} devices")


def test_processes_with_different_configs_refuse_to_start(tmp_path):
  port = _free_port()
  procs = [
      _spawn(
          [*TRAIN, *TINY, "--config.steps=1", f"--config.seed={i}", f"--workdir={tmp_path / 'w'}"],
          _env(4, (port, 2, i)),
          tmp_path / f"p{i}.log",
      )
      for i in range(2)
  ]
  try:
    rcs = [p.wait(timeout=scaled(120)) for p in procs]
  finally:
    _stop(procs)
  for i, rc in enumerate(rcs):
    log = (tmp_path / f"p{i}.log").read_text()
    assert rc == 2 and "error: processes run different configs or code versions" in log, log[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_local_sh_stops_the_rest_when_one_process_fails(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(
      "#!/bin/bash\n[[ $JAX_PROCESS_ID == 1 ]] && "
      '{ echo "boom $JAX_PROCESS_ID/$JAX_NUM_PROCESSES@$JAX_COORDINATOR_ADDRESS $*"; exit 7; }\n'
      "exec sleep 60\n"
  )
  fake.chmod(0o755)
  t0 = time.monotonic()
  env = {**os.environ, "PYTHON": str(fake), "COORDINATOR_PORT": "12345"}
  r = _run(["bash", "launch/local.sh", "3", "--workdir", "x"], env, timeout=60)
  assert r.returncode == 7 and time.monotonic() - t0 < LOCAL_SH_STOP_BOUND_S
  assert "[1] boom 1/3@127.0.0.1:12345 -m dispersion_jax train --workdir x" in r.stdout
  assert "process 1 exited with status 7; stopping the others" in r.stderr
