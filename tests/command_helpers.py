"""What the tests of commands share: running a command the way a user does (a real process), reading its one-line
error, and the processes it left behind (read from /proc)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, scaled

CONFIG = os.path.join(REPO, "configs/gpt2_tiny.py")
INTERRUPTED = 75
NOISE = re.compile(r"Traceback|<bound method|<function |object at 0x|Event loop is closed|ERROR:absl|Exception ignored")


def env() -> dict:
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}


def ctrl_c_as_in_a_terminal() -> None:
  """Popen's preexec_fn for a command the test sends SIGINT: Ctrl-C at its default, as under a terminal. A shell
  without job control starts background commands with SIGINT ignored (POSIX), and a test run launched so (`pytest
  ... &` in a script) would pass that on: the command would never see the test's Ctrl-C."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(*args: str, **kw) -> subprocess.CompletedProcess:
  timeout = scaled(kw.pop("timeout", 240))  # a hang guard
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def tree(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_line_error(r: subprocess.CompletedProcess) -> str:
  """The error line of a command that failed as a user error: exit 2, exactly one line on stderr, no noise."""
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert not NOISE.search(r.stderr + r.stdout), r.stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------------------------------------ processes
def proc_stat(pid: int) -> tuple[int, str] | None:
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
    if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
      parents[int(entry)] = st[0]
  out, todo = set(), [pid]
  while todo:
    p = todo.pop()
    kids = {c for c, pp in parents.items() if pp == p}
    todo.extend(kids - out)
    out |= kids
  return out


def ignores_sigint(pid: int) -> bool:
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
    alive = {p for p in alive if proc_stat(p) is not None}
  return alive




def history(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]



pytestmark_processes = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")


def train_cmd(workdir, *extra: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "dispersion_jax", "train",
      "--config",
      CONFIG,
      "--workdir",
      str(workdir),
      *TINY,
      *extra,
  ]


# ------------------------------------------------------------------------------------------------ runs
TIMING = ("tokens_per_s", "mfu")  # history columns that depend on the machine's speed


def committed_steps(workdir: str) -> list[int]:
  """Checkpoint steps with Orbax's commit marker (a bucket has no rename: the marker says a step is complete)."""
  from dispersion_jax.storage import paths  # noqa: PLC0415

  root = paths.path(workdir).joinpath("checkpoints")
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.joinpath("commit_success.txt").exists())


def without_timing(history: dict) -> dict:
  """A run history (metrics.read_history) without its timing columns: what two equal runs share bit for bit."""
  drop = lambda row: {m: v for m, v in row.items() if m not in TIMING}  # noqa: E731
  return {k: {s: drop(r) for s, r in rows.items()} for k, rows in history.items()}
