"""dispersion-generate (--workdir RUN [--step N] | --hf_model DIR) --prompt TEXT [--prompt TEXT ...]
    [--max_new_tokens N] [--temperature T --top_p P --top_k K --seed S] [--no_cache] [--tokenizer NAME]

Continues each prompt with the model (decode.py: one jitted loop with a KV cache, both families): greedy by default,
sampled when --temperature > 0 (then --top_k / --top_p filter, --seed fixes the draws). Prints one continuation
per prompt; generation stops at the tokenizer's end-of-text token or after --max_new_tokens. A quick look at what
a run has learnt.
"""

import time
from collections.abc import Sequence

from dispersion_jax.cli.common import FILE_ERRORS, Parser, add_model_source, check_model_source, run_main
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import DataError
from dispersion_jax.evaluation import decode
from dispersion_jax.evaluation import evaluate as ev


def parser() -> Parser:
  p = Parser(prog="dispersion-generate", description=__doc__)
  add_model_source(p)
  p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="with --temperature: keep the k most likely (0 = all)")
  p.add_argument("--top_p", type=float, default=1.0, help="with --temperature: nucleus mass (1 = all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence per token (slow)")
  p.add_argument("--tokenizer", default=None, help="override: 'gpt2' or an HF tokenizer directory")
  return p


def parse_args(argv: Sequence[str] | None = None):
  p = parser()
  args = p.parse_args(argv)
  check_model_source(p, args)
  if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
    p.error("--max_new_tokens must be >= 1, --temperature >= 0, --top_k >= 0 and --top_p in (0, 1]")
  return args


def run(args) -> list[str]:
  cfg, params, tok_name = ev.load_model(args.workdir, args.step, args.hf_model)
  try:
    tok = get_tokenizer(args.tokenizer or tok_name)
  except ValueError as e:
    raise DataError(f"tokenizer: {e}") from None
  prompts = [tok.encode(p) or [tok.eos_id] for p in args.prompt]
  keep = cfg.n_positions - args.max_new_tokens
  if keep < 1:
    raise DataError(f"--max_new_tokens {args.max_new_tokens} leaves no room in the model's {cfg.n_positions} positions")
  if max(map(len, prompts)) > keep:
    print(f"note: prompts left-truncated to their last {keep} tokens (n_positions {cfg.n_positions})")
  sampling = decode.Sampling(args.temperature > 0, args.temperature or 1.0, args.top_k, args.top_p)
  start = time.perf_counter()
  new = decode.generate(
      cfg,
      params,
      [p[-keep:] for p in prompts],
      args.max_new_tokens,
      tok.eos_id,
      sampling,
      args.seed,
      use_cache=not args.no_cache,
  )
  seconds = time.perf_counter() - start
  texts = [tok.decode([t for t in ids if t != tok.eos_id]) for ids in new]
  for prompt, text in zip(args.prompt, texts):
    print(f"--- {prompt!r}\n{prompt}{text}")
  print(f"({sum(map(len, new))} tokens in {seconds:.2f} s, compilation included)")
  return texts


@run_main(catch=FILE_ERRORS)
def main(argv: Sequence[str] | None = None) -> None:
  run(parse_args(argv))  # the result is for library callers (run); a command's outcome is its exit code


if __name__ == "__main__":
  main()
