"""python -m dispersion_jax.data.build --config CFG [--config.KEY=VALUE ...] [--workers N] [--no_keep_tokens]

Builds the run config's dataset once: tokenizes its input (data.source / data.text_dir / data.tfds_name, with the
run's tokenizer) in N worker processes and writes pre-packed blocks of seq_len + 1 tokens with train and
validation splits, in data.cache_dir (or data.data_dir). The output does not depend on N; a killed build leaves no
half-built dataset, and re-running finishes it (a finished one is not rebuilt). Training reads the result.
"""

from collections.abc import Sequence

from dispersion_jax import config as config_lib
from dispersion_jax.cli.common import Parser, add_run_config, run_main
from dispersion_jax.data import build


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax.data.build", description=__doc__, overrides=True)
  add_run_config(p, workdir=False)
  p.add_argument(
      "--workers",
      type=int,
      default=None,
      help="tokenizing processes (default: data.build_workers; 0 = one per CPU core)",
  )
  p.add_argument(
      "--no_keep_tokens",
      action="store_true",
      help="delete the tokenized files afterwards (a new seq_len then tokenizes again)",
  )
  return p


@run_main
def main(argv: Sequence[str] | None = None) -> build.BuildReport:
  args = parser().parse_args(argv)
  cfg = config_lib.load(args.config, args.overrides)
  config_lib.validate(cfg)
  return build.build(
      config_lib.data_config(cfg),
      tokenizer=cfg.tokenizer,
      seq_len=cfg.seq_len,
      workers=args.workers,
      keep_tokens=not args.no_keep_tokens,
  )


if __name__ == "__main__":
  main()
