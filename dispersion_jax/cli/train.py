"""python -m dispersion_jax.train --config configs/gpt2_tiny.py --workdir runs/demo [--config.KEY=VALUE ...]

Trains (or mid-trains, with --config.init_from) and resumes from the latest checkpoint when re-run with the same
workdir. --config.dry_run=True compiles the step for the configured mesh and prints memory and FLOPs instead.
"""

from collections.abc import Sequence


from dispersion_jax import config as config_lib
from dispersion_jax import backend, distributed, dry_run, train
from dispersion_jax.cli.common import Parser, add_launch, add_run_config, run_main


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax.train", description=__doc__, overrides=True)
  add_run_config(p)
  add_launch(p)
  return p


@run_main
def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  cfg = config_lib.load(args.config, args.overrides)
  # Before anything touches the backend (importing jax does not; jax.device_count() does).
  distributed.initialize(distributed.Launch(args.coordinator, args.num_processes, args.process_id))
  backend.start()
  config_lib.validate(cfg, dry_run.num_devices(cfg))
  distributed.check_same_config(cfg.to_dict())
  if cfg.dry_run:
    dry_run.dry_run(cfg, args.workdir)
    return
  train.run(cfg, args.workdir)


if __name__ == "__main__":
  main()
