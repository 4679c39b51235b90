"""Multi-process runs without a shared disk: two processes, each with its own HOME, TMPDIR and working directory,
given a work directory that is not the same on both (a relative path on two local disks), stop in one line within
a minute, naming the fix, instead of hanging in Orbax's first save. (Training on one gs:// workdir from processes
like these: see the bucket tests.)"""

import os
import subprocess
import sys
import time

import pytest

from test_distributed import HEARTBEAT_S, ROOT, TINY, _env, _free_port, _stop

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

BOUND_S = 60


def test_local_workdirs_that_differ_between_processes_fail_in_one_line_within_a_minute(tmp_path):
  port, procs, logs = _free_port(), [], []
  cmd = [sys.executable, "-m", "dispersion_jax", "train", *TINY, "--config.steps=2", "--workdir", "run"]
  cmd[cmd.index("configs/gpt2_tiny.py")] = str(ROOT / "configs" / "gpt2_tiny.py")
  for i in range(2):
    host = tmp_path / f"host{i}"  # a host of its own: home, temporary files, working directory
    for d in ("home", "tmp", "cwd"):
      (host / d).mkdir(parents=True)
    env = {**_env(4, (port, 2, i)), "HOME": str(host / "home"), "TMPDIR": str(host / "tmp")}
    logs.append(host / "log")
    with open(logs[-1], "w") as fh:
      procs.append(subprocess.Popen(cmd, cwd=host / "cwd", env=env, stdout=fh, stderr=subprocess.STDOUT))
  start = time.time()
  try:
    rcs = [p.wait(timeout=BOUND_S + 120) for p in procs]  # start-up (imports, joining) + the bound
  finally:
    _stop(procs)
  # The bound is the feature: start-up (imports, joining) and the check, against Orbax's hang of 600 s and more.
  assert time.time() - start < BOUND_S + 60
  for i, rc in enumerate(rcs):
    text = logs[i].read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, text[-3000:]
    assert "is not the same directory on every process" in errors[0] and "gs://" in errors[0], errors[0]
    assert "Traceback" not in text, text[-3000:]
  for i in range(2):
    assert not (tmp_path / f"host{i}" / "cwd" / "run").exists()  # nothing left behind
  assert HEARTBEAT_S < BOUND_S


def _hosts(tmp_path, name: str, port: int, cmd: list[str]) -> tuple[list[subprocess.Popen], list]:
  """Two processes of one run, each on a 'host' of its own (HOME, TMPDIR, working directory)."""
  procs, logs = [], []
  for i in range(2):
    host = tmp_path / f"{name}{i}"
    for d in ("home", "tmp", "cwd"):
      (host / d).mkdir(parents=True, exist_ok=True)
    env = {**_env(4, (port, 2, i)), "HOME": str(host / "home"), "TMPDIR": str(host / "tmp")}
    logs.append(host / "log")
    with open(logs[-1], "a") as fh:
      procs.append(subprocess.Popen(cmd, cwd=host / "cwd", env=env, stdout=fh, stderr=subprocess.STDOUT))
  return procs, logs


def test_two_hosts_without_a_shared_disk_train_into_one_bucket_are_killed_and_resume_exactly(gcs, tmp_path, data_dir):
  from command_helpers import committed_steps  # noqa: PLC0415

  from dispersion_jax.training import metrics  # noqa: PLC0415

  work = gcs.prefix("two-hosts")
  # The dataset is in the bucket as well: process 0 builds it there on first use (staged in its own TMPDIR),
  # and every host reads the same published shards.
  data = f"--config.data.cache_dir={gcs.prefix('data')}"
  base = [sys.executable, "-m", "dispersion_jax", "train", *TINY, f"--config.data.data_dir={data_dir}", data]
  base[base.index("configs/gpt2_tiny.py")] = str(ROOT / "configs" / "gpt2_tiny.py")
  procs, logs = _hosts(tmp_path, "host", _free_port(), [*base, "--config.steps=200", "--workdir", work])
  try:
    deadline = time.monotonic() + 300
    while not committed_steps(work):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      time.sleep(0.2)
    procs[1].kill()  # one host dies; the other stops within the heartbeat bound
    procs[0].wait(timeout=BOUND_S + 30)
  finally:
    _stop(procs)
  last = committed_steps(work)[-1]
  final = last + 2
  procs, logs = _hosts(tmp_path, "host", _free_port(), [*base, f"--config.steps={final}", "--workdir", work])
  try:
    rcs = [p.wait(timeout=400) for p in procs]
  finally:
    _stop(procs)
  assert rcs == [0, 0], logs[0].read_text()[-3000:]
  assert f"resuming from step {last}" in logs[0].read_text()
  # The reference: the same global mesh on one process of 8 devices, on a local disk.
  from conftest import REPO  # noqa: PLC0415
  from dispersion_jax import config as config_lib  # noqa: PLC0415
  from dispersion_jax.training import train  # noqa: PLC0415

  flags = [f.removeprefix("--config.") for f in TINY if f.startswith("--config.")]
  cfg = config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), [*flags, f"data.data_dir={data_dir}", f"steps={final}"])
  train.run(cfg, str(tmp_path / "reference"))
  got, want = metrics.read_history(work)["train"], metrics.read_history(str(tmp_path / "reference"))["train"]
  assert sorted(got) == list(range(1, final + 1))
  for step, row in got.items():
    assert row["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
