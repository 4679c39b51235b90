"""launch/local.sh: it passes a preemption's exit 75 on, and re-queues on request."""

import os
import subprocess

import pytest

from command_helpers import (
  CONFIG,
  INTERRUPTED,
)
from conftest import REPO, scaled

_FAKE_TRAINER = """#!/usr/bin/env bash
# A stand-in for python: records who started it, exits 75 (preempted) the first $FAIL_TIMES times, then 0.
echo "$PPID $DISPERSION_EXIT_WITH_PARENT" >> "$LOG"
n=$(wc -l < "$LOG")
if ((n <= FAIL_TIMES)); then exit 75; fi
exit 0
"""


@pytest.mark.parametrize("requeue", [0, 2])
def test_local_sh_passes_on_a_preemption_and_re_queues_on_request(tmp_path, requeue):
  fake = tmp_path / "python"
  fake.write_text(_FAKE_TRAINER)
  fake.chmod(0o755)
  log = tmp_path / "log"
  env = {**os.environ, "PYTHON": str(fake), "LOG": str(log), "FAIL_TIMES": "1", "LOCAL_REQUEUE": str(requeue)}
  r = subprocess.run(
      ["bash", "launch/local.sh", "1", "--config", CONFIG],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=scaled(60),  # a hang guard
  )
  starts = log.read_text().splitlines()
  if requeue:
    assert r.returncode == 0 and len(starts) == 2, r.stderr
    assert "re-queued after a preemption (1 of 2)" in r.stderr
  else:
    assert r.returncode == INTERRUPTED and len(starts) == 1, r.stderr
    assert "preempted: checkpoint saved; run the same command again to resume (exit 75)" in r.stderr
  for line in starts:  # every trainer ends with local.sh (SIGTERM: it saves first)
    ppid, lifeline = line.split()
    assert lifeline == f"{ppid}:TERM"

