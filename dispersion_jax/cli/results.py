"""python -m dispersion_jax results --sweep_dir WORKDIR --config SWEEP_CONFIG [SWEEP_CONFIG ...]
    [--group_by baseline.method,dispersion.coeff] [--reference dispersion.coeff=0,baseline.method=none]
    [--rules last,val,test] [--tasks NAME ...] [--steps S1,S2,...] [--max_checkpoints K]
    [--metrics val_loss,mean_acc,...] [--select_metrics acc/TASK,...] [--out DIR]

The results table of a finished sweep: per group (default: the sweep's axes except seed) mean ± sample std over
seeds of every evaluation metric and the difference to the group's CE-only reference, as Markdown and LaTeX
(booktabs), with each seed's checkpoint chosen by each rule: last (the last checkpoint), val (the lowest
validation loss), test (the authors' rule: the best mean task accuracy, TEST-SET SELECTION, optimistic) and,
on request, test_group (one step per group, the authors' width-study aggregator). Task metrics come from the
run's own lm_eval/TASK/METRIC rows (eval.tasks during training) when they cover the tasks, else the harness runs.
Every selected checkpoint of every finished point is evaluated once (cached in POINT/results_eval/). Writes OUT
(default WORKDIR)/
results_table.md, results_table.tex, results_table.json, results_checkpoints.csv, results_selected.csv.
"""

from collections.abc import Sequence

from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main
from dispersion_jax.research import results, results_select
from dispersion_jax.storage import paths


def _list(text: str | None) -> list[str] | None:
  return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax results", description=__doc__)
  p.add_argument("--sweep_dir", required=True, help="the sweep's --workdir (one training run per point)")
  p.add_argument(
      "--config",
      required=True,
      nargs="+",
      help="the sweep config file (configs/sweeps/*.py); several: sweeps run in the same --sweep_dir, "
      "e.g. a dispersion.coeff sweep and a baseline.method sweep, tabulated together",
  )
  p.add_argument("--group_by", default=None, help="comma-separated run config keys (default: the axes but seed)")
  p.add_argument(
      "--reference",
      default="dispersion.coeff=0,baseline.method=none",
      help="KEY=VALUE,...: the reference (CE-only) group; keys that are not grouping keys are ignored",
  )
  p.add_argument(
      "--rules",
      default=",".join(results_select.DEFAULT_RULES),
      help=f"checkpoint selections, some of {','.join(results_select.RULES)}",
  )
  p.add_argument(
      "--tasks", nargs="+", default=None, help="harness task names or suites (default: the sweep config's eval.tasks)"
  )
  p.add_argument("--steps", default=None, help="evaluate only these checkpoint steps (comma-separated)")
  p.add_argument(
      "--max_checkpoints",
      type=int,
      default=None,
      help="evaluate at most this many checkpoints per point, evenly spaced, first and last kept",
  )
  p.add_argument("--metrics", default=None, help="table columns (default: every metric)")
  p.add_argument(
      "--select_metrics", default=None, help="what the test rules maximise the mean of (default: every acc/<task>)"
  )
  p.add_argument("--out", default=None, help="output directory (default: --sweep_dir)")
  return p


def parse_args(argv: Sequence[str] | None = None):
  p = parser()
  args = p.parse_args(argv)
  if args.max_checkpoints is not None and args.max_checkpoints < 1:
    p.error("--max_checkpoints must be >= 1")
  try:
    args.steps = [int(s) for s in _list(args.steps)] if args.steps else None
  except ValueError:
    p.error(f"--steps {args.steps!r}: give comma-separated integers")
  reference = {}
  for item in _list(args.reference) or []:
    key, eq, value = item.partition("=")
    if not eq or not key:
      p.error(f"--reference {item!r}: write KEY=VALUE, e.g. dispersion.coeff=0")
    reference[key.strip()] = results_select.parse_value(value.strip())
  args.reference = reference
  args.rules = _list(args.rules)
  unknown = [r for r in args.rules if r not in results_select.RULES]
  if unknown or not args.rules:
    p.error(f"--rules {unknown[0] if unknown else ''!r}: use some of {', '.join(results_select.RULES)}")
  return args


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  results.run_results(
      args.config,
      args.sweep_dir,
      args.out,
      group_by=_list(args.group_by),
      tasks=args.tasks,
      steps=args.steps,
      max_checkpoints=args.max_checkpoints,
      rules=args.rules,
      reference=args.reference,
      metrics=_list(args.metrics),
      select_metrics=_list(args.select_metrics),
  )
  out = args.out or args.sweep_dir
  print(paths.read_text(paths.join(out, "results_table.md")))
  print(
      f"wrote {out}/results_table.md, results_table.tex, results_table.json, results_checkpoints.csv, "
      "results_selected.csv"
  )


if __name__ == "__main__":
  main()
