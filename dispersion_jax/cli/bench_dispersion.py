"""python -m dispersion_jax bench-dispersion [--preset gpt2|gpt2_b8|cpu|cpu_small] [--json out.json]
    [--batch B --seq L --dim F] [--variants angular_spread,...|all] [--impls reference,xla,pallas]
    [--block_size none,512] [--pallas_tile_n 64,128]

The dispersion term alone (value + grad, jitted) for each impl, variant and block size: median time over
interleaved rounds, compile time, XLA's memory analysis (temp bytes); research/bench_dispersion.py says how.
"""

import json

import jax

from dispersion_jax.benchmarks.bench_dispersion import PRESETS, run, table
from dispersion_jax.cli.common import Parser, run_main
from dispersion_jax.losses import dispersion_pallas
from dispersion_jax.losses.dispersion import VARIANTS


def _csv(kind):
  return lambda s: [kind(x) for x in s.split(",") if x]


def _block(s: str):
  return None if s.lower() in ("none", "dense", "0") else int(s)


def parse_args(argv=None):
  p = Parser(prog="python -m dispersion_jax bench-dispersion", description=__doc__)
  p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2", help="B, L, F (gpt2: 16, 1024, 768)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--dim", type=int, default=None)
  p.add_argument("--variants", type=_csv(str), default=["angular_spread"], help=f"comma list of {VARIANTS} or all")
  p.add_argument("--impls", type=_csv(str), default=None, help="default: reference,xla (+pallas on a GPU)")
  p.add_argument("--block_size", type=_csv(_block), default=[None, 512], help="comma list; none = dense")
  p.add_argument(
      "--pallas_tile_n",
      type=_csv(int),
      default=[dispersion_pallas.TILE_N],
      help="key-tile widths to try for the kernel (64, 128)",
  )
  p.add_argument("--dtype", default="bfloat16", help="dtype of the hidden states (the model's compute dtype)")
  p.add_argument("--clamp_threshold", type=float, default=0.1)
  p.add_argument("--max_tokens", type=int, default=None)
  p.add_argument("--repeats", type=int, default=10, help="timed rounds")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--inner", type=int, default=None, help="calls per sample (default 10 on GPU, 1 on CPU)")
  p.add_argument("--json", default=None, help="write machine, settings and rows here")
  args = p.parse_args(argv)
  if args.variants == ["all"]:
    args.variants = list(VARIANTS)
  B, L, F = PRESETS[args.preset]
  args.batch, args.seq, args.dim = args.batch or B, args.seq or L, args.dim or F
  on_gpu = jax.default_backend() == "gpu"
  args.impls = args.impls or (["reference", "xla"] + (["pallas"] if on_gpu else []))
  args.inner = args.inner or (10 if on_gpu else 1)
  return args


@run_main
def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  print(table(result))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(result, fh, indent=1)


if __name__ == "__main__":
  main()
