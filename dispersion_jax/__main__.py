"""`python -m dispersion_jax COMMAND [ARGS...]`: every command of the package, the same as its console script
`dispersion-COMMAND` (pyproject.toml's [project.scripts] lists the same table; tests/test_architecture.py keeps the
two equal). `python -m dispersion_jax` alone lists the commands."""

import importlib
import sys

# command -> the module in cli/ whose main(argv) runs it
COMMANDS = {
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "condensation": "condensation",
    "condensation-training": "condensation_training",
    "sweep": "sweep",
    "results": "results",
    "data-build": "data",
    "bench": "bench",
    "bench-data": "bench_data",
    "bench-checkpoint": "bench_checkpoint",
    "bench-dispersion": "bench_dispersion",
    "bench-harness": "bench_harness",
    "gpu-report": "gpu_report",
}
USAGE = "usage: python -m dispersion_jax COMMAND [--help | ARGS...]; commands: " + ", ".join(COMMANDS)


def main(argv: list[str] | None = None) -> int | None:
  """The command's exit code: what its main returns (None or an int; 0 done, 2 a user error, 75 interrupted:
  cli/common.py), or the code it exits with."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return None
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r} ({USAGE})", file=sys.stderr)
    sys.exit(2)
  sys.argv = [f"python -m dispersion_jax {name}", *rest]
  return importlib.import_module(f"dispersion_jax.cli.{COMMANDS[name]}").main(rest)


if __name__ == "__main__":
  sys.exit(main())
