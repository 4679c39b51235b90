"""python -m dispersion_jax bench-data [--json out.json] [--workers 1,2] [--batch_sizes 16,32] [--seq_len 1024]

The data layer on the embedded corpus: build tokens/s per number of worker processes, re-pack tokens/s, and the
step-indexed read path's tokens/s per core (numpy rows, global arrays, thread prefetch). Prints a table.
"""

from collections.abc import Sequence

from dispersion_jax.benchmarks import bench_data
from dispersion_jax.cli.common import Parser, run_main


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax bench-data", description=__doc__)
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--workers", default="1,2", help="build worker counts, comma-separated")
  p.add_argument("--batch_sizes", default="16,32", help="global batch sizes of the read benchmark")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--steps", type=int, default=200, help="steps per read measurement")
  p.add_argument("--read_threads", type=int, default=4, help="threads of the prefetching read measurement")
  p.add_argument("--work_dir", default="", help="scratch directory (default: a temporary one, removed)")
  return p


@run_main
def main(argv: Sequence[str] | None = None) -> None:
  bench_data.run(parser().parse_args(argv))  # prints its table (and writes --json)


if __name__ == "__main__":
  main()
