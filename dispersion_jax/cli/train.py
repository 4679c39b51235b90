"""python -m dispersion_jax train --config configs/gpt2_tiny.py --workdir runs/demo [--config.KEY=VALUE ...]

Trains (or mid-trains, with --config.init_from) and resumes from the latest checkpoint when re-run with the same
workdir. --config.dry_run=True compiles the step for the configured mesh and prints memory and FLOPs instead.
"""

import shlex
import sys
from collections.abc import Sequence

from dispersion_jax import config as config_lib
from dispersion_jax.cli.common import INTERRUPTED_EXIT, Parser, add_launch, add_run_config, run_main
from dispersion_jax.compile import auto_accum, dry_run
from dispersion_jax.errors import DatasetNotBuiltError
from dispersion_jax.parallel import backend, distributed
from dispersion_jax.training import train


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax train", description=__doc__, overrides=True)
  add_run_config(p)
  add_launch(p)
  return p


def build_command(args) -> str:
  """The data build command of this run: the user's own config file and --config.* flags."""
  flags = [f"--config.{key}={value}" for key, value in args.overrides]
  return " ".join(["python -m dispersion_jax data-build --config", *map(shlex.quote, [args.config, *flags])])


@run_main(interrupted="re-run the same command to resume from the last checkpoint", start_backend=False)
def main(argv: Sequence[str] | None = None) -> None:
  """Exit codes: 0 finished; 2 a user error (one line, nothing written); 75 preempted (SIGTERM or Ctrl-C): a
  checkpoint was saved, re-run the same command to resume."""
  args = parser().parse_args(argv)
  cfg = config_lib.load(args.config, args.overrides)
  # Before anything touches the backend (importing jax does not; jax.device_count() does).
  distributed.initialize(distributed.Launch(args.coordinator, args.num_processes, args.process_id))
  backend.start()
  config_lib.validate(cfg, dry_run.num_devices(cfg))
  distributed.check_same_config(cfg.to_dict())
  cfg = auto_accum.resolve(cfg, args.workdir)  # grad_accum=auto: compile, measure, choose (or reuse the record)
  if cfg.dry_run:
    dry_run.dry_run(cfg, args.workdir)
    return
  try:
    last = train.run(cfg, args.workdir)
  except DatasetNotBuiltError as e:
    raise e.with_command(build_command(args)) from None
  if last < cfg.steps:  # preempted: saved, not finished
    sys.stdout.flush()
    sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
  main()
