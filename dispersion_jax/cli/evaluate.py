"""python -m dispersion_jax.evaluate (--workdir RUN [--step N] | --hf_model DIR) [--tasks F.jsonl ...]
    [--num_fewshot K] [--seed S] [--batch_size B] [--hf_export DIR] [--out results.json]
    [--split validation [--num_batches N]]

Zero/few-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness scoring), validation loss and
perplexity through the data pipeline, export to a Hugging Face directory. Kebab-case spellings of the flags
(--hf-model, --num-fewshot, ...) are accepted for one release.
"""

import json
import os
import pathlib
import shlex
from collections.abc import Sequence
from typing import Any

from dispersion_jax.cli.common import FILE_ERRORS, Parser, add_model_source, check_model_source, run_main
from dispersion_jax.errors import DataError, DatasetNotBuiltError
from dispersion_jax.research import evaluate as ev
from dispersion_jax.tokenizer import get_tokenizer


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax.evaluate", description=__doc__)
  add_model_source(p)
  p.add_argument("--tasks", nargs="+", default=None, help="JSONL task files (default: the examples, unless --split)")
  p.add_argument("--split", default=None, help="also report loss / perplexity on this split of the run's dataset")
  p.add_argument(
      "--num_batches",
      "--num-batches",
      type=int,
      default=8,
      help="with --split: batches of --batch_size; 0 = whole split",
  )
  p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=0)
  p.add_argument("--seed", type=int, default=ev.FEWSHOT_SEED, help="few-shot sampling seed")
  p.add_argument("--batch_size", "--batch-size", type=int, default=16)
  p.add_argument("--tokenizer", default=None, help="override: 'gpt2' or an HF tokenizer directory")
  p.add_argument("--hf_export", "--hf-export", default=None, help="also write the model as an HF directory here")
  p.add_argument("--out", default=None, help="results JSON (default: print only)")
  return p


def parse_args(argv: Sequence[str] | None = None):
  p = parser()
  args = p.parse_args(argv)
  check_model_source(p, args)
  if args.num_fewshot < 0 or args.batch_size < 1 or args.num_batches < 0:
    p.error("--num_fewshot and --num_batches must be >= 0 and --batch_size >= 1")
  return args


def run(args) -> dict[str, Any]:
  cfg, params, tok_name = ev.load_model(args.workdir, args.step, args.hf_model)
  tok_name = args.tokenizer or tok_name
  try:
    tokenizer = get_tokenizer(tok_name)
  except ValueError as e:
    raise DataError(f"tokenizer: {e}") from None
  if args.hf_export:
    ev.export_hf(args.hf_export, cfg, params, tok_name)
    print(f"wrote Hugging Face directory {args.hf_export}")
  results: dict[str, Any] = {
      "model": args.hf_model or args.workdir,
      "step": args.step,
      "tokenizer": tok_name,
      "num_fewshot": args.num_fewshot,
      "seed": args.seed,
      "tasks": {},
  }
  if args.split:
    try:
      pp = ev.perplexity(
          cfg,
          params,
          ev.data_config(args.workdir, cfg, tok_name),
          split=args.split,
          num_batches=args.num_batches or None,
          batch_size=args.batch_size,
      )
    except DatasetNotBuiltError as e:
      if not args.workdir:
        raise
      flags = [f"--config.tokenizer={args.tokenizer}"] if args.tokenizer else []
      raise e.with_command(
          " ".join(["python -m dispersion_jax.data.build --workdir", *map(shlex.quote, [args.workdir, *flags])])
      ) from None
    results["perplexity"] = pp
    print(f"{args.split:<24} loss={pp['loss']:.4f}  ppl={pp['ppl']:.2f}  ({pp['tokens']} tokens)")
  tasks = args.tasks if args.tasks is not None else [] if args.split else [str(t) for t in ev.DEFAULT_TASKS]
  for path in tasks:
    name = pathlib.Path(path).stem
    res = ev.evaluate_task(
        cfg,
        params,
        tokenizer,
        ev.load_task(path),
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    results["tasks"][name] = res
    print(f"{name:<24} n={res['num_examples']:<5d} acc={res['acc']:.4f}  acc_norm={res['acc_norm']:.4f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")
  return results


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
