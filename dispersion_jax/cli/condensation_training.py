"""python -m dispersion_jax condensation-training --workdirs RUN [RUN ...] [--labels A,B,...]
    (--corpus default --num_texts K | --texts FILE | --token_ids F.npy) --max_length N --out DIR
    [--steps S1,S2,...] [--max_checkpoints K] [--batch_size B] [--num_bins K]

Embedding condensation over training: the per-layer token-token cosine statistics of every checkpoint of each run
(cached in RUN/condensation_cache/), drawn as the paper's figure (one row of heatmaps per run, one column per
checkpoint step) with a line plot of the mean cosine per layer over steps and a table (Markdown + CSV) of the mean
cosine per layer and the Spearman correlation with depth, per step and run (research/condensation_training.py).
"""

from collections.abc import Sequence
from typing import Any

from dispersion_jax.cli.common import FILE_ERRORS, Parser, run_main
from dispersion_jax.evaluation.condensation import NUM_BINS
from dispersion_jax.research import condensation_report as rep
from dispersion_jax.research import condensation_training as ct


def _int_list(text: str) -> list[int]:
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"--steps {text!r}: give comma-separated integers, e.g. 100,200") from None


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax condensation-training", description=__doc__)
  p.add_argument("--workdirs", nargs="+", required=True, metavar="RUN", help="training run directories")
  p.add_argument("--labels", default=None, help="comma-separated, one per run (default: the directory names)")
  data = p.add_mutually_exclusive_group(required=True)
  data.add_argument("--texts", help="UTF-8 text file, one text per line")
  data.add_argument("--token_ids", help=".npy int array [num_texts, length]; negative ids = trailing padding")
  data.add_argument("--corpus", choices=["default"], help="the embedded default English corpus")
  p.add_argument("--num_texts", type=int, default=None, help="with --corpus: texts spread evenly over it")
  p.add_argument("--max_length", type=int, required=True, help="tokens per text (also capped at n_positions)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--steps", default=None, help="only these checkpoint steps (comma-separated)")
  p.add_argument(
      "--max_checkpoints",
      type=int,
      default=None,
      help="at most this many checkpoints per run, evenly spaced, first and last kept",
  )
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--num_bins", type=int, default=NUM_BINS)
  return p


def parse_args(argv: Sequence[str] | None = None):
  p = parser()
  args = p.parse_args(argv)
  if (args.corpus is None) != (args.num_texts is None):
    p.error("--corpus and --num_texts go together")
  if args.num_texts is not None and args.num_texts < 1:
    p.error("--num_texts must be >= 1")
  if args.max_length < 2 or args.batch_size < 1 or args.num_bins < 1:
    p.error("--max_length must be >= 2, --batch_size and --num_bins >= 1")
  if args.max_checkpoints is not None and args.max_checkpoints < 1:
    p.error("--max_checkpoints must be >= 1")
  if args.labels is not None and len(args.labels.split(",")) != len(args.workdirs):
    p.error(f"--labels has {len(args.labels.split(','))} labels for {len(args.workdirs)} --workdirs")
  return args


def run(args) -> dict[str, Any]:
  source = args.texts or args.token_ids or f"corpus:{args.corpus}"
  result = ct.over_training(
      args.workdirs,
      lambda tok: rep.load_token_lists(args, tok),
      max_length=args.max_length,
      labels=args.labels.split(",") if args.labels else None,
      steps=_int_list(args.steps) if args.steps else None,
      max_checkpoints=args.max_checkpoints,
      batch_size=args.batch_size,
      num_bins=args.num_bins,
      source=source,
  )
  ct.write_report(result, args.out)
  for r in result["runs"]:
    sp = " ".join(f"{s}:{rep.fmt(r['summaries'][s]['spearman'])}" for s in r["steps"])
    print(f"{r['label']}: spearman by step {sp}")
  print(f"wrote {args.out}/{', '.join(ct.FILES.values())}")
  return result


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  run(parse_args(argv))  # the result is for library callers (run); a command's outcome is its exit code


if __name__ == "__main__":
  main()
