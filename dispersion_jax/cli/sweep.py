"""python -m dispersion_jax sweep --config configs/sweeps/NAME.py [--workdir runs/sweeps/NAME] [--vmap]
    [--max_members K] [--no_eval]

Runs the cross product of a sweep config's axes as ordinary training runs (skipping finished points, resuming
interrupted ones), evaluates them and tabulates the results (research/sweep.py says what a sweep config holds).
--vmap trains points that differ only in seed / dispersion.coeff together in one compiled step. Kebab-case
spellings (--max-members, --no-eval) are accepted for one release.
"""

import sys
from collections.abc import Sequence

from dispersion_jax.cli.common import FILE_ERRORS, INTERRUPTED_EXIT, Parser, run_main
from dispersion_jax.research.sweep import run_sweep


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax sweep", description=__doc__)
  p.add_argument("--config", required=True, help="sweep config file (configs/sweeps/*.py)")
  p.add_argument("--workdir", default=None, help="default: runs/sweeps/<config name>")
  p.add_argument("--vmap", action="store_true", help="train points differing only in seed/coeff in one step")
  p.add_argument(
      "--max_members", "--max-members", type=int, default=None, help="at most this many members per vmapped step"
  )
  p.add_argument("--no_eval", "--no-eval", action="store_true", help="train only")
  return p


@run_main(catch=FILE_ERRORS, interrupted="re-run the same command to resume the sweep")
def main(argv: Sequence[str] | None = None) -> None:
  """Exit codes: 0 done; 2 a user error; 75 preempted (SIGTERM or Ctrl-C: the running points saved a checkpoint;
  re-run the same command to resume)."""
  args = parser().parse_args(argv)
  rows = run_sweep(args.config, args.workdir, vmap=args.vmap, max_members=args.max_members, evaluate=not args.no_eval)
  if any(str(r["status"]).startswith(("stopped", "not started")) for r in rows):
    sys.stdout.flush()
    sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
  main()
