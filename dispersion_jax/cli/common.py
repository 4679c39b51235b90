"""What every command shares: one argument parser style (snake_case flags; argparse), run configs given as
`--config FILE [--config.KEY=VALUE ...]`, launch flags for multi-process runs, and the exit codes:

  0   done
  2   a user error: one line `error: ...` on stderr, nothing else after it, nothing created
  75  interrupted (SIGTERM, e.g. a preemption, or Ctrl-C): what was done is kept (training saved a checkpoint, a
      build keeps its finished work units); re-run the same command to continue. Schedulers re-queue on it
      (EX_TEMPFAIL of sysexits.h: "try again later"). Also a checkpoint save or restore that the storage did not
      complete within checkpoint_timeout_s (StorageUnavailableError): one line `error: ...`, the last complete
      checkpoint stays the resume point, re-run when the storage answers.
"""

import argparse
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from dispersion_jax.errors import StorageUnavailableError, UserError, clean_message
from dispersion_jax.parallel import backend, distributed

USAGE_EXIT = 2
INTERRUPTED_EXIT = 75  # EX_TEMPFAIL: preempted or interrupted, re-run the same command to continue
FILE_ERRORS = (UserError, ValueError, OSError)  # tools reading user files: their readers' messages are one line


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (argparse prints the usage block first) and `--config.KEY=VALUE` overrides."""

  def __init__(self, *args, overrides: bool = False, **kw):
    kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kw.setdefault("allow_abbrev", False)
    super().__init__(*args, **kw)
    self._overrides = overrides
    if overrides:
      self.add_argument(
          "--config.KEY=VALUE",
          dest="_override_help",
          action="append",
          metavar="",
          help="override one setting of the run config (typed by dispersion_jax/config.py); " "repeat as needed",
      )

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(USAGE_EXIT)

  def parse_args(self, args: Sequence[str] | None = None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    overrides, rest = [], []
    for a in args:
      if self._overrides and a.startswith("--config."):
        name, eq, value = a.partition("=")
        if not eq:
          self.error(f"{a}: write overrides as --config.KEY=VALUE")
        overrides.append((name[len("--config.") :], value))
      else:
        rest.append(a)
    ns = super().parse_args(rest, namespace)
    ns.overrides = overrides
    if hasattr(ns, "_override_help"):
      del ns._override_help
    return ns


def add_run_config(p: Parser, workdir: bool = True, required: bool = True) -> None:
  p.add_argument("--config", required=required, metavar="FILE", help="a config file (configs/*.py)")
  if workdir:
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="checkpoints, metrics and logs; re-running with the same one resumes",
    )


def add_launch(p: Parser) -> None:
  g = p.add_argument_group("multi-process runs (else from JAX_* variables, SLURM or a Cloud TPU VM)")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's coordination service")
  g.add_argument("--num_processes", type=int)
  g.add_argument("--process_id", type=int)


def add_model_source(p: Parser) -> None:
  """`--workdir RUN [--step N] | --hf_model DIR`: the model a research tool reads."""
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--workdir", help="a training run: its latest (or --step) checkpoint and its tokenizer")
  g.add_argument(
      "--hf_model",
      "--hf-model",
      dest="hf_model",
      metavar="DIR",
      help="a Hugging Face model directory (config.json + safetensors)",
  )
  p.add_argument("--step", type=int, default=None, help="with --workdir: this checkpoint step (default: latest)")


def check_model_source(p: Parser, args: argparse.Namespace) -> None:
  if args.step is not None and not args.workdir:
    p.error("--step needs --workdir")


class Interrupted(KeyboardInterrupt):
  """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that `finally` blocks (a build's pool
  shutdown, temporary files) run before the command exits."""


def _raise_interrupted(signum, frame):
  raise Interrupted(signal.Signals(signum).name)


def run_main(
    fn: Callable | None = None,
    *,
    catch: tuple[type[BaseException], ...] = (UserError,),
    interrupted: str = "re-run the same command to start again",
    start_backend: bool = True,
) -> Callable:
  """Wraps a command's main: a user error (UserError; the tools that read user files also ValueError / OSError)
  becomes one line on stderr and exit code 2; SIGTERM and Ctrl-C end it through its `finally` blocks with one
  line (`interrupted` says what to do) and exit code 75. Commands that save state install their own handlers
  (training: a checkpoint at the next step boundary). `start_backend`: start JAX's backend first, quietly (the
  CUDA plugin of the `compile` extra writes no-driver notes to fd 2 wherever it starts); training starts it itself,
  after joining its peers."""
  if fn is None:
    return functools.partial(run_main, catch=catch, interrupted=interrupted, start_backend=start_backend)

  @functools.wraps(fn)
  def wrapper(*args, **kw):
    backend.prefer_cpu_without_accelerator()  # before the backend starts: no TPU / CUDA probing on a CPU box
    if start_backend:
      backend.start()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
      previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
      previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
      return fn(*args, **kw)
    except catch as e:
      _exiting(main_thread)
      fail(str(e))
    except StorageUnavailableError as e:
      _exiting(main_thread)
      line = " ".join(clean_message(str(e)).split())
      print(f"error: {line}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      # Not sys.exit: threads of the storage libraries may still wait on the storage that failed (Orbax's commit
      # thread, TensorStore's retries), and the interpreter would join them at exit: the bound would not hold.
      os._exit(INTERRUPTED_EXIT)
    except KeyboardInterrupt as e:
      _exiting(main_thread)
      name = str(e) if isinstance(e, Interrupted) else "SIGINT"
      print(f"interrupted ({name}): {interrupted}", file=sys.stderr, flush=True)
      distributed.exit_now(INTERRUPTED_EXIT)
    finally:
      for sig, handler in previous.items():  # None: a handler installed outside Python
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)

  return wrapper


def _exiting(main_thread: bool) -> None:
  """Reporting and exiting: a second SIGTERM or Ctrl-C now would only add a traceback."""
  if main_thread:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fail(message: str) -> None:
  """Exit 2 with `error: <message>`: one line (library text cleaned of object reprs and joined)."""
  line = " ".join(clean_message(message).split())
  print(f"error: {line}", file=sys.stderr, flush=True)
  distributed.exit_now(USAGE_EXIT)  # multi-process: no shutdown barrier with peers still computing
