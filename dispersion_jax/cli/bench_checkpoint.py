"""python -m dispersion_jax bench-checkpoint [--n_layer 12] [--bucket gs://BUCKET/prefix] [--repeats 2]
    [--steps 12] [--every 4] [--json bench_checkpoint.json]

Checkpoint save and restore time of a GPT-2 small-shaped train state (parameters + Adam, float32: 1.49 GB at 12
blocks; --n_layer shrinks it) on a local disk and in a bucket (a GCS emulator started from the checkout's
tests/gcs_emulator.py, or --bucket), and the time per step of a loop that saves with async checkpointing on and
off: benchmarks/bench_checkpoint.py says how. Prints a table, writes JSON.
"""

from dispersion_jax.benchmarks.bench_checkpoint import run
from dispersion_jax.cli.common import Parser, run_main


def parse_args(argv=None):
  p = Parser(prog="python -m dispersion_jax bench-checkpoint", description=__doc__)
  p.add_argument("--n_layer", type=int, default=12, help="GPT-2 small blocks (12 = 124.4M parameters, 1.49 GB)")
  p.add_argument("--bucket", default=None, help="gs://BUCKET/prefix of a real bucket (default: an emulator)")
  p.add_argument("--repeats", type=int, default=2, help="save/restore: the best of this many")
  p.add_argument("--steps", type=int, default=12, help="steps of each timed loop")
  p.add_argument("--every", type=int, default=4, help="the loop saves every this many steps")
  p.add_argument("--json", default="bench_checkpoint.json", help="where the results go")
  args = p.parse_args(argv)
  if min(args.n_layer, args.repeats, args.steps, args.every) < 1:
    p.error("--n_layer, --repeats, --steps and --every must be >= 1")
  return args


@run_main
def main(argv=None) -> None:
  a = parse_args(argv)
  run(a.n_layer, a.bucket, a.repeats, a.steps, a.every, a.json)


if __name__ == "__main__":
  main()
