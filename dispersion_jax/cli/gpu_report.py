"""python -m dispersion_jax gpu-report DIR [--json bench.json]

The GPU check's report (launch/gpu_check.sh): every benchmark JSON in DIR merged into one document (--json) and a
Markdown table of the rows against the performance targets on stdout (research/gpu_report.py says how).
"""

import json
import os

from dispersion_jax.benchmarks import gpu_report
from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main
from dispersion_jax.errors import UserError


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax gpu-report", description=__doc__)
  p.add_argument("directory", help="the folder of benchmark JSON files (one per run)")
  p.add_argument("--json", default=None, help="write {run name: its JSON} here")
  return p


def run(args) -> str:
  """Prints the report (and writes --json); returns its text."""
  if not os.path.isdir(args.directory):
    raise UserError(f"{args.directory} is not a folder of benchmark JSON files")
  runs = gpu_report.load_runs(args.directory)
  text = gpu_report.report(runs)
  print(text)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(runs, fh, indent=1)
  return text


@run_main(catch=FILE_ERRORS)
def main(argv=None) -> None:
  run(parser().parse_args(argv))


if __name__ == "__main__":
  main()
