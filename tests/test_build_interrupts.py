"""A data build that is killed or interrupted: no process it started outlives it, SIGTERM and Ctrl-C end it
in one line with exit 75 and keep its finished work units. Real processes, read from /proc."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from command_helpers import (
  CONFIG,
  INTERRUPTED,
  NOISE,
  descendants,
  env,
  ignores_sigint,
  pytestmark_processes,
  wait_gone,
)
from conftest import REPO


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
      "dispersion_jax", "data-build",
      "--config",
      CONFIG,
      "--config.data.source=text_dir",
      f"--config.data.text_dir={text_dir}",
      f"--config.data.cache_dir={cache}",
      "--workers",
      "2",
  ]
  return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _workers(proc: subprocess.Popen, *, working: bool, timeout: float = 120) -> set[int]:
  """The build's two spawn workers, once they exist (and, `working`, run their initializer: tokenizing)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"the build ended early ({proc.returncode})"
    kids = descendants(proc.pid)
    workers = {p for p in kids if b"spawn_main" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()}
    if len(workers) == 2 and (not working or all(ignores_sigint(p) for p in workers)):
      return workers
    time.sleep(0.02)
  proc.kill()
  raise AssertionError("the build's two workers never showed up")




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

