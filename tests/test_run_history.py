"""One metrics history per run: after a kill -9 and a resume, or a resume from an earlier checkpoint, every
(step, kind) appears once and equals the uninterrupted run's; TensorBoard hides the re-computed steps. The
rewind and read rules themselves: the fast tests at the end."""

import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import time

import pytest

from dispersion_jax.training import metrics

from command_helpers import (
  env,
  history,
  pytestmark_processes,
  train_cmd,
)
from conftest import REPO, scaled, tiny_cfg


def _comparable(rows: list[dict]) -> list[dict]:
  """The train and eval rows without the timing columns (wall clock, not the computation)."""
  drop = ("tokens_per_s", "mfu")
  return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["kind"] in ("train", "eval")]


def _unique(rows: list[dict]) -> bool:
  keys = [(r["step"], r["kind"]) for r in rows]
  return len(keys) == len(set(keys))


def _complete_rows(path: str) -> list[dict]:
  try:
    with open(path) as fh:
      return [json.loads(line) for line in fh if line.endswith("\n")]
  except (OSError, json.JSONDecodeError):
    return []


@pytest.mark.slow
@pytestmark_processes
def test_kill_9_after_a_logged_step_then_resume_gives_the_uninterrupted_history(tmp_path, data_dir):
  """Steps logged after the last checkpoint are computed again on resume: the file keeps each (step, kind) once
  and equals the uninterrupted run's (before: the re-logged steps appeared twice)."""
  flags = [f"--config.data.data_dir={data_dir}", "--config.steps=32", "--config.checkpoint_every=8"]
  flags += ["--config.eval_every=8", "--config.max_to_keep=None"]
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"

  def start(workdir, log):  # output to files: a full pipe would stall the run
    with open(tmp_path / log, "w") as fh:
      return subprocess.Popen(train_cmd(workdir, *flags), cwd=REPO, env=env(), stdout=fh, stderr=fh)

  def checkpoints() -> list[int]:
    folder = killed_dir / "checkpoints"  # finished ones only: Orbax writes a temporary name, then renames it
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if folder.is_dir() else []

  straight = start(straight_dir, "straight.log")
  # kill -9 right after a step that was logged but is not checkpointed. No race with the clock: the run is frozen
  # (SIGSTOP) while the test reads its files, so what the test sees is exactly what the kill leaves; otherwise it
  # runs on (SIGCONT). Most of its time is such a moment; a run that ends before one was seen is started again.
  for _ in range(3):
    shutil.rmtree(killed_dir, ignore_errors=True)
    killed, jsonl = start(killed_dir, "killed.log"), str(killed_dir / "metrics.jsonl")
    caught = False
    while not caught and killed.poll() is None:  # no clock: the run ends by itself (32 steps) if never caught
      killed.send_signal(signal.SIGSTOP)
      steps = [r["step"] for r in _complete_rows(jsonl) if r.get("kind") == "train"]
      ckpts = checkpoints()
      caught = bool(steps and ckpts and steps[-1] >= 10 and steps[-1] > ckpts[-1])
      if caught:
        killed.kill()  # a stopped process dies of SIGKILL as it is
      else:
        killed.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    killed.wait(timeout=scaled(30))
    if caught:
      break
    assert killed.returncode == 0, (tmp_path / "killed.log").read_text()[-3000:]  # finished before it was caught
  else:
    raise AssertionError("three runs finished before one was frozen between a logged step and its checkpoint")
  ckpts = checkpoints()
  logged = max(r["step"] for r in _complete_rows(jsonl) if r.get("kind") == "train")
  assert logged > max(ckpts), (logged, ckpts)  # the case to test
  resumed = subprocess.run(train_cmd(killed_dir, *flags), capture_output=True, text=True, cwd=REPO, env=env())
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert straight.wait(timeout=scaled(240)) == 0, (tmp_path / "straight.log").read_text()[-3000:]
  got, want = history(killed_dir), history(straight_dir)
  assert _unique(got), [(r["step"], r["kind"]) for r in got]
  assert _comparable(got) == _comparable(want)  # bit for bit, every step and evaluation once
  (resume,) = [r for r in got if r["kind"] == "resume"]
  assert resume["step"] == max(ckpts, default=0) and resume["discarded_through"] >= logged
  assert resume["discarded_rows"] >= logged - resume["step"]


def _events(path: pathlib.Path) -> list:
  """The events of a TensorBoard file (TFRecord framing: length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2

  out, data, i = [], path.read_bytes(), 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    ev = event_pb2.Event()
    ev.ParseFromString(data[i + 12 : i + 12 + n])
    out.append(ev)
    i += 12 + n + 4
  return out


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_rewrites_the_history_and_tensorboard(trained, tmp_path, data_dir):
  """The issue's case: the newest checkpoints deleted (damaged), the run resumed from an earlier one. Before: two
  histories interleaved in metrics.jsonl, the step-8 and step-12 rows twice with different values."""
  from dispersion_jax.training import train

  src, flags = trained
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  want = history(workdir)
  for step in ("8", "12"):
    shutil.rmtree(workdir / "checkpoints" / step)
  tb_before = set((workdir / "tensorboard").iterdir())
  assert train.run(tiny_cfg(data_dir, *flags), str(workdir)) == 12
  got = history(workdir)
  assert _unique(got) and _comparable(got) == _comparable(want)
  (resume,) = [r for r in got if r["kind"] == "resume"]
  assert resume == {
      "step": 4,
      "kind": "resume",
      "discarded_rows": len([r for r in want if r["step"] > 4]),
      "discarded_through": 12,
      "changed": {},
      "restarts": 1,
  }
  assert got.index(resume) == max(i for i, r in enumerate(got) if r["step"] <= 4)  # where the history restarts
  (new_file,) = set((workdir / "tensorboard").iterdir()) - tb_before
  purge = [e for e in _events(new_file) if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in purge] == [(5, 1)]  # SessionLog.START: TensorBoard drops >= 5


def _row(step, kind="train", **kw):
  return {"step": step, "kind": kind, **kw}


def test_rewind_keeps_the_steps_up_to_the_checkpoint_and_repairs_a_cut_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [_row(1, loss=1.0), _row(2, loss=0.9), _row(2, "eval", val_loss=2.0), _row(3, loss=0.8)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "kind": "tr')  # killed mid-line
  dropped, previous = metrics.rewind(str(path), 2)
  assert dropped == [rows[3]] and previous is None
  assert history(tmp_path) == rows[:3]
  path.write_text(path.read_text() + '{"step": 3, "ki')  # nothing to drop, but a cut line: rewritten
  assert metrics.rewind(str(path), 3) == ([], None) and history(tmp_path) == rows[:3]


def test_a_second_restart_from_the_same_step_updates_its_resume_row(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(_row(s, loss=1.0 / s)) + "\n" for s in range(1, 7)))
  first = metrics.MetricsLogger(str(tmp_path), 10, 4, progress=False)
  first.record_resume(4, {"steps": (6, 8)})
  first.log(5, {"loss": 0.2})
  first.close()
  again = metrics.MetricsLogger(str(tmp_path), 10, 4, progress=False)
  row = again.record_resume(4, {"steps": (8, 10)})
  again.close()
  assert row == {
      "step": 4,
      "kind": "resume",
      "discarded_rows": 3,
      "discarded_through": 6,
      "changed": {"steps": [6, 10]},
      "restarts": 2,
  }
  rows = history(tmp_path)
  assert [(r["step"], r["kind"]) for r in rows] == [(s, "train") for s in range(1, 5)] + [(4, "resume")]


def test_read_history_skips_resume_rows_and_reads_files_of_the_previous_version(tmp_path):
  old = [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.9}, {"step": 10, "val_loss": 3.0}, {"step": 5, "loss": 2.0}]
  rows = old + [_row(5, "resume", discarded_rows=2)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  h = metrics.read_history(str(tmp_path))
  assert h["train"] == {5: old[3], 10: old[1]} and h["eval"] == {10: old[2]}  # a re-logged step: its last row


