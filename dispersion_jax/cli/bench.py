"""python -m dispersion_jax bench [--config configs/bench.py] [--config.KEY=VALUE[,VALUE...] ...]
    [--repeats 5] [--compile_only] [--torch_baseline [--torch_compile]] [--data_batches N] [--json out.json]
python -m dispersion_jax bench --vmap_members 4,8 --config configs/gpt2_tiny.py [--config.KEY=VALUE ...]

Times the compiled train step of each benchmark point (a run config: the config file plus overrides; a
comma-separated value is an axis, crossed with the others) and its coeff-0 twin, in one run with interleaved
timing rounds; prints a markdown table and writes the rows as JSON. research/bench.py says how it measures.
The model and batch flags of earlier releases (--layers --dim --heads --vocab --seq --batch --variant --coeff
--max_tokens --block_size --ce_chunk --remat --scan --dtype --attention --preset; kebab or snake case) are
accepted for one release as aliases of the config keys they set (0 / "none" = None for max_tokens, block_size,
ce_chunk).
"""

import json
from collections.abc import Sequence

import jax

from dispersion_jax.benchmarks import bench
from dispersion_jax.cli.common import Parser, run_main
from dispersion_jax.config import load
from dispersion_jax.research import vmap_train

# The previous release's flags -> the config keys they set: the row columns of research/bench.py, which bear the
# same names, except the two added since (family, impl), which exist only as --config.* overrides.
ALIASES = {flag: key for flag, key in bench.FIELDS.items() if flag not in ("family", "impl")}
_NONE_IF_ZERO = {"max_tokens", "block_size", "ce_chunk"}


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax bench", description=__doc__, overrides=True)
  p.add_argument("--config", default="configs/bench.py", metavar="FILE", help="the base run config")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps_per_repeat", "--steps-per-repeat", type=int, default=1)
  p.add_argument(
      "--compile_only",
      "--compile-only",
      action="store_true",
      help="lower + compile + memory analysis, nothing allocated or run",
  )
  p.add_argument(
      "--torch_baseline",
      "--torch-baseline",
      action="store_true",
      help="also time HF GPT-2 + PyTorch dispersion (requirements-bench.txt)",
  )
  p.add_argument("--torch_compile", "--torch-compile", action="store_true")
  p.add_argument(
      "--data_batches",
      "--data-batches",
      type=int,
      default=0,
      help="also measure the input pipeline alone over N batches",
  )
  p.add_argument("--peak_flops", "--peak-flops", type=float, default=None)
  p.add_argument(
      "--vmap_members",
      default=None,
      metavar="K,K",
      help="instead: the vmapped multi-model step vs K ordinary steps (sweeps' --vmap)",
  )
  p.add_argument("--json", default=None, help="write the rows here")
  old = p.add_argument_group("aliases of config keys (one release)")
  for flag in ALIASES:
    names = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
    old.add_argument(*names, dest=f"alias_{flag}", default=None, help=f"= --config.{ALIASES[flag]}")
  return p


def overrides_of(args) -> list[tuple[str, str]]:
  """The aliases as config overrides (then the --config.KEY=VALUE ones, which win). `--preset` means the preset's
  shape, as it did: it clears the config file's n_layer / n_embd / n_head (explicit aliases still apply)."""
  out = []
  if args.alias_preset is not None:
    out += [("model.n_layer", "None"), ("model.n_embd", "None"), ("model.n_head", "None")]
  for flag, key in ALIASES.items():
    value = getattr(args, f"alias_{flag}")
    if value is None:
      continue
    if flag in _NONE_IF_ZERO:
      value = ",".join("None" if v.lower() in ("0", "none", "dense") else v for v in value.split(","))
    out.append((key, value))
  return out + list(args.overrides)


@run_main
def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  overrides = overrides_of(args)
  if args.vmap_members:
    cfg = load(args.config, overrides)
    rows = vmap_train.benchmark(
        cfg, [int(k) for k in args.vmap_members.split(",")], steps=args.steps_per_repeat, repeats=args.repeats
    )
    print(f"device: {jax.devices()[0].device_kind}")
    print(vmap_train.table(rows))
  else:
    if args.torch_baseline:
      from dispersion_jax.benchmarks import bench_torch  # noqa: PLC0415 - torch is an optional extra

      bench_torch.require_torch()  # fail in one line before compiling anything
    opts = bench.Options(
        warmup=args.warmup,
        repeats=args.repeats,
        steps_per_repeat=args.steps_per_repeat,
        compile_only=args.compile_only,
        torch_baseline=args.torch_baseline,
        torch_compile=args.torch_compile,
        data_batches=args.data_batches,
        peak_flops=args.peak_flops,
    )
    rows = bench.run(args.config, overrides, opts)
    print(bench.table(rows))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
