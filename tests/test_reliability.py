"""What a command leaves behind when it is killed, interrupted, resumed or refused: no process outlives a build,
metrics.jsonl (and TensorBoard) hold one history, a resume refuses a changed model, every user error is one line
that creates nothing, a preempted or interrupted command exits 75. Real processes wherever the behaviour is about
processes. The history and config rules themselves: the fast tests at the end."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, tiny_cfg, write_run
from dispersion_jax import config as config_lib
from dispersion_jax import metrics
from dispersion_jax.errors import ConfigError

CONFIG = os.path.join(REPO, "configs/gpt2_tiny.py")
INTERRUPTED = 75
NOISE = re.compile(r"Traceback|<bound method|<function |object at 0x|Event loop is closed|ERROR:absl|Exception ignored")


def _env() -> dict:
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}


def _python(*args: str, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=kw.pop("timeout", 240)
  )


def _tree(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_line_error(r: subprocess.CompletedProcess) -> str:
  """The error line of a command that failed as a user error: exit 2, exactly one line on stderr, no noise."""
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert not NOISE.search(r.stderr + r.stdout), r.stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[int, str] | None:
  """(parent pid, state) of a process, None if it is gone. A zombie (exited, not yet reaped) counts as gone."""
  try:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  state, ppid = text[text.rindex(")") + 2 :].split()[:2]
  return None if state in ("Z", "X") else (int(ppid), state)


def descendants(pid: int) -> set[int]:
  """Every living process below `pid` (children, their children, ...), from /proc."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit() and (st := _stat(int(entry))) is not None:
      parents[int(entry)] = st[0]
  out, todo = set(), [pid]
  while todo:
    p = todo.pop()
    kids = {c for c, pp in parents.items() if pp == p}
    todo.extend(kids - out)
    out |= kids
  return out


def _ignores_sigint(pid: int) -> bool:
  """A build worker past its initializer (it ignores Ctrl-C, the parent handles it)."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  ignored = int(re.search(r"SigIgn:\s*([0-9a-f]+)", status).group(1), 16)
  return bool(ignored & (1 << (signal.SIGINT - 1)))


def wait_gone(pids: set[int], seconds: float) -> set[int]:
  deadline = time.monotonic() + seconds
  alive = set(pids)
  while alive and time.monotonic() < deadline:
    time.sleep(0.1)
    alive = {p for p in alive if _stat(p) is not None}
  return alive


@pytest.fixture(scope="module")
def text_input(tmp_path_factory) -> pathlib.Path:
  """Four .jsonl files of ~6 MB of English-like text: a few seconds of tokenizing per worker."""
  root = tmp_path_factory.mktemp("text")
  words = "the river stone light garden silver morning quiet north field bread window letter market".split()
  para = " ".join(words[(i * 7) % len(words)] for i in range(120))
  for f in range(4):
    with open(root / f"part{f}.jsonl", "w") as fh:
      fh.writelines(json.dumps({"text": f"document {f}-{i}: {para}"}) + "\n" for i in range(8000))
  return root


def _start_build(text_dir: pathlib.Path, cache: pathlib.Path, stderr=subprocess.PIPE) -> subprocess.Popen:
  cmd = [
      sys.executable,
      "-m",
      "dispersion_jax.data.build",
      "--config",
      CONFIG,
      "--config.data.source=text_dir",
      f"--config.data.text_dir={text_dir}",
      f"--config.data.cache_dir={cache}",
      "--workers",
      "2",
  ]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _workers(proc: subprocess.Popen, *, working: bool, timeout: float = 120) -> set[int]:
  """The build's two spawn workers, once they exist (and, `working`, run their initializer: tokenizing)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"the build ended early ({proc.returncode})"
    kids = descendants(proc.pid)
    workers = {p for p in kids if b"spawn_main" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()}
    if len(workers) == 2 and (not working or all(_ignores_sigint(p) for p in workers)):
      return workers
    time.sleep(0.02)
  proc.kill()
  raise AssertionError("the build's two workers never showed up")


pytestmark_processes = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")


@pytest.mark.slow
@pytestmark_processes
@pytest.mark.parametrize("when", ["starting", "working"])
def test_kill_9_of_a_build_leaves_no_process_it_started(text_input, tmp_path, when):
  """Killed while its workers still import the package, or while they tokenize: workers and the resource tracker
  end within seconds (before: they ran on for ever under PID 1, ~300 MB each)."""
  with open(tmp_path / "stderr", "w") as err:
    proc = _start_build(text_input, tmp_path / "cache", stderr=err)
  workers = _workers(proc, working=when == "working")
  started = descendants(proc.pid)  # the workers and multiprocessing's resource tracker
  assert workers <= started and len(started) >= 3, started
  proc.kill()
  left = wait_gone(started, 10)  # before reaping the build: an unreaped (zombie) parent is a dead one too
  proc.wait(timeout=30)
  assert not left, {p: pathlib.Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left}


@pytest.mark.slow
@pytestmark_processes
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_a_build_in_one_line_with_exit_75(text_input, tmp_path, sig):
  cache = tmp_path / "cache"
  proc = _start_build(text_input, cache)
  _workers(proc, working=True)
  started = descendants(proc.pid)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=60)
  lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not re.match(r"\s*(tokenize|pack):", x)]
  assert proc.returncode == INTERRUPTED, err[-3000:]
  assert lines == [
      f"interrupted ({sig.name}): the finished work units are kept; re-run the same command to finish the build"
  ], err[-3000:]
  assert not NOISE.search(err), err[-3000:]
  assert not wait_gone(started, 10)
  assert sorted(os.listdir(cache / "dispersion_packed")) == ["tokens"]  # no dataset, no temporary directory


# ------------------------------------------------------------------------------------------------ history
def _history(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def _comparable(rows: list[dict]) -> list[dict]:
  """The train and eval rows without the timing columns (wall clock, not the computation)."""
  drop = ("tokens_per_s", "mfu")
  return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["kind"] in ("train", "eval")]


def _unique(rows: list[dict]) -> bool:
  keys = [(r["step"], r["kind"]) for r in rows]
  return len(keys) == len(set(keys))


def _train_cmd(workdir, *extra: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "dispersion_jax.train",
      "--config",
      CONFIG,
      "--workdir",
      str(workdir),
      *TINY,
      *extra,
  ]


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
      return subprocess.Popen(_train_cmd(workdir, *flags), cwd=REPO, env=_env(), stdout=fh, stderr=fh)

  straight = start(straight_dir, "straight.log")
  for attempt in range(3):  # kill -9 right after a step that was logged but is not checkpointed
    shutil.rmtree(killed_dir, ignore_errors=True)
    killed, jsonl = start(killed_dir, "killed.log"), str(killed_dir / "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
      assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
      steps = [r["step"] for r in _complete_rows(jsonl) if r.get("kind") == "train"]
      if steps and steps[-1] >= 10 and steps[-1] % 8 in (2, 3, 4, 5, 6):
        killed.kill()
        break
      time.sleep(0.01)
    killed.wait(timeout=30)
    ckpts = [int(n) for n in os.listdir(killed_dir / "checkpoints") if n.isdigit()]
    logged = max((r["step"] for r in _complete_rows(jsonl) if r.get("kind") == "train"), default=0)
    if logged > max(ckpts, default=0):  # the case to test (a busy machine may let the run pass a checkpoint)
      break
  else:
    raise AssertionError("never killed the run between a logged step and the next checkpoint")
  resumed = subprocess.run(_train_cmd(killed_dir, *flags), capture_output=True, text=True, cwd=REPO, env=_env())
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert straight.wait(timeout=240) == 0, (tmp_path / "straight.log").read_text()[-3000:]
  got, want = _history(killed_dir), _history(straight_dir)
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A 12-step run with a checkpoint every 4 steps (all kept), logging every 2, evaluating every 4."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  flags = ["--config.steps=12", "--config.checkpoint_every=4", "--config.log_every=2", "--config.eval_every=4"]
  from dispersion_jax import train

  cfg = tiny_cfg(data_dir, *flags, "--config.max_to_keep=None")
  assert train.run(cfg, str(workdir)) == 12
  return workdir, flags + ["--config.max_to_keep=None"]


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_rewrites_the_history_and_tensorboard(trained, tmp_path, data_dir):
  """The issue's case: the newest checkpoints deleted (damaged), the run resumed from an earlier one. Before: two
  histories interleaved in metrics.jsonl, the step-8 and step-12 rows twice with different values."""
  from dispersion_jax import train

  src, flags = trained
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  want = _history(workdir)
  for step in ("8", "12"):
    shutil.rmtree(workdir / "checkpoints" / step)
  tb_before = set((workdir / "tensorboard").iterdir())
  assert train.run(tiny_cfg(data_dir, *flags), str(workdir)) == 12
  got = _history(workdir)
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


@pytest.mark.slow
def test_a_changed_model_is_refused_on_resume_and_a_changed_objective_is_announced(trained, tmp_path, data_dir, capsys):
  """n_head=8 on a run trained with 4 heads has the same weight shapes: it used to train on silently and record
  n_head=8 for the whole run."""
  from dispersion_jax import train
  from dispersion_jax.cli.train import main as train_main

  src, flags = trained
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  argv = ["--config", CONFIG, "--workdir", str(workdir), *TINY, *flags, f"--config.data.data_dir={data_dir}"]
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    train_main([*argv, "--config.steps=14", "--config.model.n_head=8", "--config.seed=3"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(err) == 1, err
  assert "model.n_head (checkpoint 4, now 8), seed (checkpoint 0, now 3)" in err[0]
  assert "--config.model.n_head=4 --config.seed=0" in err[0]
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # nothing written
  # The dispersion term (and the optimizer's settings) may change on purpose: announced, recorded, trained.
  cfg = tiny_cfg(data_dir, *flags, "--config.steps=14", "--config.dispersion.coeff=0.5", "--config.optimizer.lr=1e-3")
  assert train.run(cfg, str(workdir)) == 14
  out = capsys.readouterr().out
  assert (
      "warning: the run trains with other settings from step 13 on (dispersion.coeff 0.1 -> 0.5, optimizer.lr "
      "0.003 -> 0.001)" in out
  ), out
  assert "resuming from step 12 with changed settings: steps 12 -> 14" in out
  (resume,) = [r for r in _history(workdir) if r["kind"] == "resume"]
  assert resume["step"] == 12
  assert resume["changed"] == {"dispersion.coeff": [0.1, 0.5], "optimizer.lr": [0.003, 0.001], "steps": [12, 14]}
  saved = train.load_run_config(str(workdir))
  assert (saved.steps, saved.dispersion.coeff) == (14, 0.5)


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
  """A run whose newest checkpoint has a truncated array file (as a full disk or a copy cut short leaves it)."""
  workdir = tmp_path_factory.mktemp("damaged") / "run"
  write_run(workdir, 3)
  arrays = sorted((workdir / "checkpoints/3/state").rglob("d/*"), key=lambda p: p.stat().st_size)
  big = arrays[-1]
  with open(big, "r+b") as fh:
    fh.truncate(big.stat().st_size // 2)
  return workdir


def _cases(tmp: pathlib.Path, damaged: pathlib.Path) -> dict:
  empty, text = tmp / "empty", tmp / "text"
  data = [
      "--config.data.source=text_dir",
      f"--config.data.text_dir={text}",
      f"--config.data.cache_dir={tmp / 'my cache'}",
  ]
  return {
      "evaluate, no checkpoint": (
          ["-m", "dispersion_jax.evaluate", "--workdir", str(empty)],
          f"error: no checkpoint in {empty}/checkpoints; train first",
      ),
      "evaluate, truncated checkpoint": (
          ["-m", "dispersion_jax.evaluate", "--workdir", str(damaged)],
          "cannot be restored (ValueError: OUT_OF_RANGE",
      ),
      "train, unbuilt text_dir": (
          _train_cmd(tmp / "new run", *data)[1:],
          "build it with `python -m dispersion_jax.data.build --config "
          + " ".join(map(shlex.quote, [CONFIG, *TINY, *data]))
          + "`",
      ),
      "data build, no input": (
          [
              "-m",
              "dispersion_jax.data.build",
              "--config",
              CONFIG,
              "--config.data.source=text_dir",
              f"--config.data.text_dir={tmp / 'none'}",
              f"--config.data.cache_dir={tmp / 'c'}",
          ],
          "does not exist",
      ),
      "condensation, no checkpoint": (
          [
              "-m",
              "dispersion_jax.condensation",
              "--workdir",
              str(empty),
              "--corpus",
              "default",
              "--num_texts",
              "2",
              "--max_length",
              "16",
              "--out",
              str(tmp / "out"),
          ],
          "no checkpoint in",
      ),
      "condensation over training, no checkpoint": (
          [
              "-m",
              "dispersion_jax.cli.condensation_training",
              "--workdirs",
              str(empty),
              "--corpus",
              "default",
              "--num_texts",
              "2",
              "--max_length",
              "16",
              "--out",
              str(tmp / "out"),
          ],
          "no checkpoint in",
      ),
      "results, no sweep": (
          [
              "-m",
              "dispersion_jax.cli.results",
              "--sweep_dir",
              str(tmp / "none"),
              "--config",
              os.path.join(REPO, "configs/sweeps/demo.py"),
          ],
          "is not a directory",
      ),
      "sweep, no config": (["-m", "dispersion_jax.sweep", "--config", str(tmp / "none.py")], "not found"),
      "bench, unknown key": (["-m", "dispersion_jax.bench", "--config.model.n_heads=4"], "unknown config key"),
  }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "evaluate, no checkpoint",
        "evaluate, truncated checkpoint",
        "train, unbuilt text_dir",
        "data build, no input",
        "condensation, no checkpoint",
        "condensation over training, no checkpoint",
        "results, no sweep",
        "sweep, no config",
        "bench, unknown key",
    ],
)
def test_every_user_error_is_one_line_that_creates_nothing(case, tmp_path, damaged_run):
  (tmp_path / "empty").mkdir()
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.jsonl").write_text('{"text": "a document"}\n')
  argv, expected = _cases(tmp_path, damaged_run)[case]
  before, damaged_before = _tree(tmp_path), _tree(damaged_run)
  line = one_line_error(_python(*argv))
  assert expected in line, line
  assert _tree(tmp_path) == before and _tree(damaged_run) == damaged_before  # not even an empty directory


# ------------------------------------------------------------------------------------------------ launch/local.sh
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
      timeout=60,
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


# ------------------------------------------------------------------------------------------------ the rules
def _row(step, kind="train", **kw):
  return {"step": step, "kind": kind, **kw}


def test_rewind_keeps_the_steps_up_to_the_checkpoint_and_repairs_a_cut_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [_row(1, loss=1.0), _row(2, loss=0.9), _row(2, "eval", val_loss=2.0), _row(3, loss=0.8)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "kind": "tr')  # killed mid-line
  dropped, previous = metrics.rewind(str(path), 2)
  assert dropped == [rows[3]] and previous is None
  assert _history(tmp_path) == rows[:3]
  path.write_text(path.read_text() + '{"step": 3, "ki')  # nothing to drop, but a cut line: rewritten
  assert metrics.rewind(str(path), 3) == ([], None) and _history(tmp_path) == rows[:3]


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
  rows = _history(tmp_path)
  assert [(r["step"], r["kind"]) for r in rows] == [(s, "train") for s in range(1, 5)] + [(4, "resume")]


def test_read_history_skips_resume_rows_and_reads_files_of_the_previous_version(tmp_path):
  old = [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.9}, {"step": 10, "val_loss": 3.0}, {"step": 5, "loss": 2.0}]
  rows = old + [_row(5, "resume", discarded_rows=2)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  h = metrics.read_history(str(tmp_path))
  assert h["train"] == {5: old[3], 10: old[1]} and h["eval"] == {10: old[2]}  # a re-logged step: its last row


def _saved_and_new(*overrides: str):
  saved = config_lib.load(CONFIG, [o.removeprefix("--config.") for o in TINY])
  new = config_lib.load(CONFIG, [o.removeprefix("--config.") for o in [*TINY, *overrides]])
  return config_lib.from_saved(saved.to_dict()), new


def test_resume_changes_refuses_what_changes_the_model_or_the_state_and_names_the_flags():
  for flag, key in [
      ("--config.model.n_head=8", "model.n_head"),
      ("--config.seq_len=16", "seq_len"),
      ("--config.seed=1", "seed"),
      ("--config.tokenizer=other", "tokenizer"),
      ("--config.optimizer.clip=None", "optimizer.clip"),
      ("--config.baseline.method=neftune", "baseline.method"),
      ("--config.data.source=text_dir", "data.source"),
      ("--config.model.dtype=bfloat16", "model.dtype"),
  ]:
    saved, new = _saved_and_new(flag)
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
      config_lib.resume_changes(saved, new, "the checkpoint")
    assert "\n" not in str(e.value) and f"--config.{key}=" in str(e.value)


def test_resume_changes_accepts_length_cadence_layout_and_dispersion():
  allowed = [
      "--config.steps=99",
      "--config.log_every=3",
      "--config.eval_every=7",
      "--config.checkpoint_every=5",
      "--config.max_to_keep=None",
      "--config.batch_size=16",
      "--config.grad_accum=2",
      "--config.mesh.data=2",
      "--config.model.remat=full",
      "--config.data.read_threads=0",
      "--config.data.cache_dir=/elsewhere",
      "--config.dispersion.coeff=0.5",
      "--config.dispersion.impl=reference",
      "--config.optimizer.lr=1e-4",
      "--config.optimizer.clip=0.5",
  ]
  saved, new = _saved_and_new(*allowed)
  changed = config_lib.resume_changes(saved, new, "the checkpoint")
  assert set(changed) == {a.removeprefix("--config.").split("=")[0] for a in allowed}
  assert changed["dispersion.coeff"] == (0.1, 0.5)
  # The same model spelled differently (the preset's own value left to the preset): no change.
  saved, new = _saved_and_new("--config.model.n_head=None")  # the tiny preset has 4 heads too
  assert config_lib.resume_changes(saved, new, "the checkpoint") == {}
