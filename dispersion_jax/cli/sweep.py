"""python -m dispersion_jax.sweep --config configs/sweeps/NAME.py [--workdir runs/sweeps/NAME] [--vmap]
    [--max_members K] [--no_eval]

Runs the cross product of a sweep config's axes as ordinary training runs (skipping finished points, resuming
interrupted ones), evaluates them and tabulates the results (research/sweep.py says what a sweep config holds).
--vmap trains points that differ only in seed / dispersion.coeff together in one compiled step. Kebab-case
spellings (--max-members, --no-eval) are accepted for one release.
"""

from collections.abc import Sequence

from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main
from dispersion_jax.research.sweep import run_sweep


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax.sweep", description=__doc__)
  p.add_argument("--config", required=True, help="sweep config file (configs/sweeps/*.py)")
  p.add_argument("--workdir", default=None, help="default: runs/sweeps/<config name>")
  p.add_argument("--vmap", action="store_true", help="train points differing only in seed/coeff in one step")
  p.add_argument(
      "--max_members", "--max-members", type=int, default=None, help="at most this many members per vmapped step"
  )
  p.add_argument("--no_eval", "--no-eval", action="store_true", help="train only")
  return p


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  run_sweep(args.config, args.workdir, vmap=args.vmap, max_members=args.max_members, evaluate=not args.no_eval)


if __name__ == "__main__":
  main()
