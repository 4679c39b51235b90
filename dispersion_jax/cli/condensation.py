"""python -m dispersion_jax condensation (--workdir RUN [--step N] | --hf_model DIR)
    (--texts FILE | --token_ids FILE.npy | --corpus default --num_texts K) --max_length N --out DIR
    [--compare OTHER/condensation.json [--labels A,B]]

Per-layer token-token cosine similarity (embedding condensation): OUT/condensation.json, a heatmap, a line plot and,
with --compare, an overlay. Kebab-case spellings (--hf-model, --num-texts, ...) are accepted for one release.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from dispersion_jax.cli.common import FILE_ERRORS, Parser, add_model_source, check_model_source, run_main
from dispersion_jax.evaluation.condensation import NUM_BINS, model_statistics
from dispersion_jax.evaluation.evaluate import load_model
from dispersion_jax.research import condensation_report as rep


def parse_args(argv: Sequence[str] | None = None):
  p = Parser(prog="python -m dispersion_jax condensation", description=__doc__)
  add_model_source(p)
  data = p.add_mutually_exclusive_group(required=True)
  data.add_argument("--texts", help="UTF-8 text file, one text per line")
  data.add_argument(
      "--token_ids", "--token-ids", help=".npy int array [num_texts, length]; negative ids = trailing padding"
  )
  data.add_argument("--corpus", choices=["default"], help="the embedded default English corpus")
  p.add_argument(
      "--num_texts", "--num-texts", type=int, default=None, help="with --corpus: texts spread evenly over it"
  )
  p.add_argument(
      "--max_length", "--max-length", type=int, required=True, help="tokens per text (also capped at n_positions)"
  )
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--batch_size", "--batch-size", type=int, default=8)
  p.add_argument("--num_bins", "--num-bins", type=int, default=NUM_BINS)
  p.add_argument("--tokenizer", default=None, help="override: 'gpt2' or an HF tokenizer directory")
  p.add_argument("--compare", default=None, help="another run's condensation.json to overlay")
  p.add_argument("--labels", default=None, help="A,B: legend labels for this run and --compare")
  args = p.parse_args(argv)
  check_model_source(p, args)
  if (args.corpus is None) != (args.num_texts is None):
    p.error("--corpus and --num-texts go together")
  if args.num_texts is not None and args.num_texts < 1:
    p.error("--num-texts must be >= 1")
  if args.max_length < 2 or args.batch_size < 1 or args.num_bins < 1:
    p.error("--max-length must be >= 2, --batch-size and --num-bins >= 1")
  if args.labels is not None and (args.compare is None or len(args.labels.split(",")) != 2):
    p.error("--labels takes two comma-separated labels A,B and needs --compare")
  return args


def run(args) -> dict[str, Any]:
  other = rep.read_summary(args.compare) if args.compare else None  # fail before the expensive part
  cfg, params, tok_name = load_model(args.workdir, args.step, args.hf_model)
  tok_name = args.tokenizer or tok_name
  token_lists = rep.load_token_lists(args, tok_name)
  summary = model_statistics(
      cfg, params, token_lists, max_length=args.max_length, batch_size=args.batch_size, num_bins=args.num_bins
  )
  source = args.texts or args.token_ids or f"corpus:{args.corpus}"
  model_name = args.hf_model or f"{args.workdir}@{'latest' if args.step is None else args.step}"
  summary["settings"].update(model=model_name, source=source, tokenizer=None if args.token_ids else tok_name)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, rep.FILES["json"]), "w") as fh:
    json.dump(summary, fh, indent=1)
  rep.write_plots(summary, args.out, f"{os.path.basename(os.path.normpath(model_name))}: {summary['num_texts']} texts")
  print(
      f"{summary['num_texts']} texts, {summary['num_tokens']} tokens; mean cosine by layer "
      + " ".join(f"{m:.3f}" for m in summary["mean_cossim_by_layer"])
      + f"; spearman {rep.fmt(summary['spearman'])} kendall {rep.fmt(summary['kendall'])}; wrote {args.out}"
  )
  if other is not None:
    labels = args.labels.split(",") if args.labels else [model_name, other.get("settings", {}).get("model", "other")]
    print(f"wrote {rep.write_compare([summary, other], labels, args.out)}")
  return summary


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  run(parse_args(argv))  # the result is for library callers (run); a command's outcome is its exit code


if __name__ == "__main__":
  main()
