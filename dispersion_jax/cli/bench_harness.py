"""python -m dispersion_jax bench-harness [--torch_python PYTHON] [--batch_size 16] [--repeats 3] [--json OUT]

Requests/s of our lm-evaluation-harness model (harness.JaxLM) against the harness's torch HFLM on the same tiny
GPT-2 and requests, and decoder tokens/s with and without the KV cache; prints a table, writes JSON. HFLM runs in
PYTHON (a Python with torch, transformers and lm_eval, e.g. /work/refvenv/bin/python); without it, ours only.
research/bench_harness.py says how it measures.
"""

import json
from collections.abc import Sequence

from dispersion_jax.benchmarks import bench_harness
from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax bench-harness", description=__doc__)
  p.add_argument("--torch_python", default=None, help="a Python with torch + transformers + lm_eval, for HFLM")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None, help="write the numbers here")
  return p


@run_main(catch=FILE_ERRORS + (RuntimeError,))
def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  rows = bench_harness.run(args.torch_python, batch_size=args.batch_size, repeats=args.repeats)
  print(bench_harness.table(rows))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
