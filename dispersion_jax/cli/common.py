"""What every command shares: one argument parser style (snake_case flags; argparse), run configs given as
`--config FILE [--config.KEY=VALUE ...]`, launch flags for multi-process runs, and user errors reported as one
line `error: ...` with exit code 2.
"""

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from dispersion_jax import backend, distributed
from dispersion_jax.errors import UserError

USAGE_EXIT = 2
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


def run_main(fn: Callable | None = None, *, catch: tuple[type[BaseException], ...] = (UserError,)) -> Callable:
  """Wraps a command's main: a user error (UserError; the tools that read user files also ValueError / OSError)
  becomes one line on stderr and exit code 2."""
  if fn is None:
    return functools.partial(run_main, catch=catch)

  @functools.wraps(fn)
  def wrapper(*args, **kw):
    backend.prefer_cpu_without_accelerator()  # before the backend starts: no TPU / CUDA probing on a CPU box
    try:
      return fn(*args, **kw)
    except catch as e:
      print(f"error: {e}", file=sys.stderr)
      distributed.exit_now(USAGE_EXIT)  # multi-process: no shutdown barrier with peers still computing

  return wrapper
