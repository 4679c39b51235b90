"""python -m dispersion_jax eval (--workdir RUN [--step N] | --hf_model DIR) [--tasks NAME[,NAME...]]
    [--include_path DIR] [--data_dir DIR] [--num_fewshot K] [--limit N] [--batch_size B] [--output_path OUT.json]
    [--log_samples] [--split validation [--num_batches N]] [--hf_export DIR] [--peft_export DIR]

Runs lm-evaluation-harness tasks on the model (harness.JaxLM: our JAX model as the harness's language model):
built-in task names (piqa, arc_easy, mmlu, ...), task YAMLs under --include_path, the shipped examples
(example_arithmetic, example_cloze: the default unless --split), and the suites `paper` / `paper_qwen3` (the
paper's ten tasks + paloma_wikitext_103 with the authors' shots and limits). --data_dir points every task at local
copies of its data (docs/evaluation.md). OUT.json holds what lm_eval.simple_evaluate returns. Also validation loss /
perplexity on the run's own data (--split), export to a Hugging Face directory (--hf_export; a LoRA run's adapters
merged) and, for a LoRA run, its adapters as a PEFT adapter directory (--peft_export; `PeftModel.from_pretrained(
<the HF base model>, DIR)`). Kebab-case spellings of the flags (--hf-model, --num-fewshot, ...) are accepted for
one release.
"""

import json
import os
import shlex
from collections.abc import Sequence
from typing import Any

from dispersion_jax.cli.common import FILE_ERRORS, Parser, add_model_source, check_model_source, run_main
from dispersion_jax.errors import DatasetNotBuiltError
from dispersion_jax.evaluation import evaluate as ev
from dispersion_jax.interop import peft
from dispersion_jax.storage import paths
from dispersion_jax.training import saved_run


def parser() -> Parser:
  p = Parser(prog="python -m dispersion_jax eval", description=__doc__)
  add_model_source(p)
  p.add_argument("--tasks", default=None, help="comma-separated harness task names or suites (paper, paper_qwen3)")
  p.add_argument("--include_path", "--include-path", default=None, help="a folder of your own task YAMLs")
  p.add_argument("--data_dir", "--data-dir", default=None, help="local copies of the tasks' datasets (by Hub id)")
  p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None, help="default: each task's (suite's)")
  p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
  p.add_argument("--log_samples", "--log-samples", action="store_true", help="keep every request in OUT.json")
  p.add_argument(
      "--bootstrap_iters", type=int, default=100000, help="bootstrap draws for stderrs, as the harness (0: none)"
  )
  p.add_argument("--seed", type=int, default=0, help="sampling seed of generation tasks")
  p.add_argument("--split", default=None, help="also report loss / perplexity on this split of the run's dataset")
  p.add_argument(
      "--num_batches",
      "--num-batches",
      type=int,
      default=8,
      help="with --split: batches of --batch_size; 0 = whole split",
  )
  p.add_argument("--batch_size", "--batch-size", type=int, default=16)
  p.add_argument("--tokenizer", default=None, help="override: 'gpt2' or an HF tokenizer directory")
  p.add_argument("--hf_export", "--hf-export", default=None, help="also write the model as an HF directory here")
  p.add_argument("--peft_export", default=None, metavar="DIR", help="a LoRA run: also write its PEFT adapter here")
  p.add_argument("--output_path", "--out", default=None, help="results JSON (default: print only)")
  return p


def parse_args(argv: Sequence[str] | None = None):
  p = parser()
  args = p.parse_args(argv)
  check_model_source(p, args)
  if (args.num_fewshot or 0) < 0 or args.batch_size < 1 or args.num_batches < 0 or (args.limit or 1) <= 0:
    p.error("--num_fewshot and --num_batches must be >= 0, --batch_size >= 1 and --limit > 0")
  for flag in ("include_path", "data_dir"):
    if getattr(args, flag) and not os.path.isdir(getattr(args, flag)):
      p.error(f"--{flag} {getattr(args, flag)} is not a directory")
  if args.peft_export and not args.workdir:
    p.error("--peft_export needs --workdir (a LoRA training run)")
  return args


def run(args) -> dict[str, Any]:
  for flag in ("workdir", "hf_model", "hf_export", "peft_export", "output_path"):  # s3:// etc.: one line, before work
    if getattr(args, flag):
      paths.path(getattr(args, flag), what=f"--{flag}")
  cfg, params, tok_name = ev.load_model(args.workdir, args.step, args.hf_model)
  tok_name = args.tokenizer or tok_name
  if args.hf_export:
    ev.export_hf(args.hf_export, cfg, params, tok_name)
    print(f"wrote Hugging Face directory {args.hf_export}")
  if args.peft_export:
    run_cfg, model_cfg, spec, adapters = saved_run.load_lora(args.workdir, args.step)
    peft.save_adapter(args.peft_export, model_cfg, spec, adapters, base_model=run_cfg.init_from)
    print(f"wrote PEFT adapter directory {args.peft_export}")
  results: dict[str, Any] = {}
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
          " ".join(["python -m dispersion_jax data-build --workdir", *map(shlex.quote, [args.workdir, *flags])])
      ) from None
    results["perplexity"] = pp
    print(f"{args.split:<24} loss={pp['loss']:.4f}  ppl={pp['ppl']:.2f}  ({pp['tokens']} tokens)")
  tasks = args.tasks.split(",") if args.tasks else [] if args.split else list(ev.DEFAULT_TASKS)
  if tasks:
    from lm_eval.utils import handle_non_serializable, make_table

    lm = ev.harness_lm(cfg, params, tok_name, batch_size=args.batch_size, seed=args.seed)
    out = ev.run_harness(
        lm,
        [t.strip() for t in tasks if t.strip()],
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        data_dir=args.data_dir,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(make_table(out))
    results.update(out)
    results = json.loads(json.dumps(results, default=handle_non_serializable))
  results["model"] = {"source": args.hf_model or args.workdir, "step": args.step, "tokenizer": tok_name}
  if args.output_path:
    out_path = paths.path(paths.absolute(args.output_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"wrote {args.output_path}")
  return results


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  run(parse_args(argv))  # the result is for library callers (run); a command's outcome is its exit code


if __name__ == "__main__":
  main()
