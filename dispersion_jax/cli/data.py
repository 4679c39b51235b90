"""python -m dispersion_jax data-build (--config CFG | --workdir RUN) [--config.KEY=VALUE ...] [--workers N]
    [--no_keep_tokens] [--beam_pipeline_options="runner=...,..."]

Builds the run config's dataset once: tokenizes its input (data.source / data.text_dir / data.tfds_name, with the
run's tokenizer) in N worker processes and writes pre-packed blocks of seq_len + 1 tokens with train and
validation splits, in data.cache_dir (or data.data_dir). --workdir RUN: the dataset a training run was trained on
(the run config of its latest checkpoint). The output does not depend on N; a killed build leaves no half-built
dataset and no worker process, and re-running finishes it (a finished one is not rebuilt). Training reads the
result. --beam_pipeline_options runs the same stages as an Apache Beam pipeline (TFDS's flag: comma-separated
Beam options, passed on unchanged): "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"
on one host, "runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp" on Dataflow; the same bytes as
the worker pool's. Exit codes: 0 built; 2 a user error (one line); 75 interrupted by SIGTERM or Ctrl-C (the workers are
stopped, finished work units are kept: re-run to finish).
"""

from collections.abc import Sequence

from dispersion_jax import config as config_lib
from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main
from dispersion_jax.data import build
from dispersion_jax.training import saved_run


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax data-build", description=__doc__, overrides=True)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", metavar="FILE", help="a config file (configs/*.py)")
  source.add_argument("--workdir", metavar="RUN", help="a training run: the dataset its checkpoints were trained on")
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
  p.add_argument(
      "--beam_pipeline_options",
      metavar="OPTIONS",
      default=None,
      help='run the build as an Apache Beam pipeline with these options, e.g. "runner=DirectRunner,'
      'direct_num_workers=2,direct_running_mode=multi_processing" (name the runner; needs the beam extra)',
  )
  return p


def run(args) -> build.BuildReport:
  if args.workdir:
    cfg = saved_run.load_run_config(args.workdir)
    for key, value in args.overrides:
      config_lib.apply_override(cfg, key, value)
  else:
    cfg = config_lib.load(args.config, args.overrides)
  config_lib.validate(cfg)
  return build.build(
      config_lib.data_config(cfg),
      tokenizer=cfg.tokenizer,
      seq_len=cfg.seq_len,
      workers=args.workers,
      keep_tokens=not args.no_keep_tokens,
      beam_options=args.beam_pipeline_options,
  )


@run_main(
    catch=FILE_ERRORS, interrupted="the finished work units are kept; re-run the same command to finish the build"
)
def main(argv: Sequence[str] | None = None) -> None:
  run(parser().parse_args(argv))  # the report is printed by the build; the exit code says how it ended


if __name__ == "__main__":
  main()
