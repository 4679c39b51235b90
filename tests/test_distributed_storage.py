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
