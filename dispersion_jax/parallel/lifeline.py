"""Child processes that end with their parent, however the parent ends (`kill -9` included).

A process started by one of our commands (a data build's worker, a trainer started by launch/local.sh) calls
`exit_with_parent(parent)` as early as it can: on Linux the kernel signals it when its parent dies
(prctl PR_SET_PDEATHSIG), elsewhere (and as a second line) a daemon thread sees its parent pid change (the orphan is
re-parented) within POLL_S. The signal is SIGKILL for workers whose work is disposable, SIGTERM for a trainer (it
saves a checkpoint and exits). A leaf module (standard library only): `dispersion_jax/__init__.py` calls
`from_environment()` first thing, so a spawned worker is covered while it is still importing the package.
"""

import ctypes
import os
import signal
import sys
import threading
import time

ENV = "DISPERSION_EXIT_WITH_PARENT"  # "PID[:SIGNAL]": children of PID end with it (SIGNAL: KILL or TERM)
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_installed: set[int] = set()


def environment(parent: int, sig: signal.Signals = signal.SIGKILL) -> str:
  """The value of ENV that makes the children of `parent` end with it (by `sig`)."""
  return f"{parent}:{sig.name.removeprefix('SIG')}"


def from_environment() -> None:
  """Applies ENV if this process is a child of the process it names (a grandchild is left alone); if that process
  is gone already (it died while this one was starting), this one ends at once."""
  text = os.environ.get(ENV, "")
  pid, _, name = text.partition(":")
  if not pid.isdigit():
    return
  try:
    sig = signal.Signals[f"SIG{name or 'KILL'}"]
  except KeyError:
    sig = signal.SIGKILL
  if os.getppid() == int(pid):
    exit_with_parent(int(pid), sig)
  elif not alive(int(pid)):
    os.kill(os.getpid(), sig)


def alive(pid: int) -> bool:
  """Whether process `pid` exists on this host and has not exited (a zombie, exited but not yet reaped by its
  parent, counts as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as fh:
      text = fh.read()
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")
  except (OSError, ValueError, IndexError):  # no /proc (macOS): os.kill said it exists
    return True


def exit_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
  """Ends this process (by `sig`) once process `parent`, its parent, is gone. Idempotent."""
  if parent in _installed:
    return
  _installed.add(parent)
  if sys.platform.startswith("linux"):
    try:
      ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
      pass  # no prctl: the thread below still notices
  if os.getppid() != parent:  # the parent died before prctl took effect
    os.kill(os.getpid(), sig)

  def watch():
    while os.getppid() == parent:
      time.sleep(POLL_S)
    os.kill(os.getpid(), sig)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
