"""The harness on 2 real JAX processes (loopback, 2 CPU devices each, the batch sharded over all 4): process 0
runs lm-evaluation-harness, process 1 follows its jitted calls; both finish, and process 0's per-request answers
are the torch HFLM reference's (tests/data/harness/reference.json) for a multiple-choice and a generation task."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

import harness_helpers  # noqa: E402
from conftest import scaled  # noqa: E402
from test_distributed import ROOT, _env, _free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_two_processes_evaluate_without_deadlock(tmp_path):
  model = harness_helpers.make_tiny_hf("gpt2", tmp_path / "gpt2")
  out = tmp_path / "out.json"
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(2, (port, 2, i))
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    log = open(tmp_path / f"p{i}.log", "w")
    procs.append(
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "harness_multiprocess_worker.py"), model, str(out)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
  try:
    codes = [p.wait(timeout=scaled(400)) for p in procs]  # a hang guard
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert all(f"process {i} done" in logs[i] for i in range(2))
  ours = json.loads(out.read_text())
  ref = json.loads(harness_helpers.REFERENCE.read_text())["families"]["gpt2"]["runs"]["zero_shot"]["samples"]
  assert ours["tiny_gen"] == [s["resps"] for s in ref["tiny_gen"]]
  for mine, theirs in zip(ours["tiny_mc"], ref["tiny_mc"], strict=True):
    for (a, ga), (b, gb) in zip((r[0] for r in mine), (r[0] for r in theirs["resps"]), strict=True):
      assert abs(a - b) <= 1e-4 and ga == gb
