"""Speed of the harness route on this machine: requests/s of harness.JaxLM.loglikelihood against the harness's
own torch HFLM on the same model directory and requests (HFLM in a second Python that has torch, through
bench_hflm_worker.py), and decoder tokens/s with and without the KV cache (decode.generate).

The model: GPT-2 `tiny` (4 layers, width 256, 256 positions, GPT-2 vocabulary), random weights (speed does not
depend on them), written as a Hugging Face directory. The requests: the shipped example tasks as 5-shot multiple
choice (8 questions per task, 2 shots: the paper's k-shot prompt shape, 64 requests), every choice one request. Times are medians of `repeats` rounds after a
warm-up round (ours: compilation happens there; its time is reported separately); the loglikelihood rounds of
ours and HFLM alternate, so a load change on a shared machine hits both.
"""

import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

import jax
import numpy as np

from dispersion_jax import models
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.evaluation import decode, harness
from dispersion_jax.evaluation import evaluate as ev

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_hflm_worker.py")


def requests(shots: int = 2, seed: int = 0, docs_per_task: int = 8) -> list[tuple[str, str]]:
  """(context, continuation) of every choice of the example tasks, each context after `shots` other examples."""
  rng = np.random.default_rng(seed)
  docs = []
  for name in ev.DEFAULT_TASKS:
    with open(ev.TASK_DIR / f"{name}.jsonl") as fh:
      docs += [json.loads(line) for line in fh if line.strip()][:docs_per_task]
  out = []
  for i, d in enumerate(docs):
    others = rng.choice([j for j in range(len(docs)) if j != i], size=shots, replace=False)
    prefix = "".join(docs[j]["context"] + docs[j]["choices"][docs[j]["gold"]] + "\n\n" for j in others)
    out += [(prefix + d["context"], c) for c in d["choices"]]
  return out


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """(first call's seconds, median of the next `repeats`)."""
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times[0], statistics.median(times[1:])


def _hflm_round(torch_python: str, model_dir: str, reqs, batch_size: int) -> dict[str, Any]:
  """One HFLM process: a warm-up pass and one timed pass over the requests."""
  job = {"model_dir": model_dir, "requests": reqs, "batch_size": batch_size, "repeats": 1, "threads": 0}
  proc = subprocess.run([torch_python, WORKER], input=json.dumps(job), capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"HFLM worker failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout)


def run(
    torch_python: str | None, *, batch_size: int = 16, repeats: int = 3, gen_batch: int = 4, gen_tokens: int = 32
) -> dict[str, Any]:
  cfg = models.GPTConfig.preset("tiny")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tok = get_tokenizer("gpt2")
  reqs = requests()
  rows: dict[str, Any] = {"model": "gpt2 tiny (4x256, 256 positions, vocab 50257)", "requests": len(reqs)}
  rows["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  from lm_eval.api.instance import Instance

  lm = harness.JaxLM(cfg, params, tok, batch_size=batch_size)
  inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
  start = time.perf_counter()
  ours = [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)]  # compiles
  first = time.perf_counter() - start
  # Interleaved rounds (ours, then HFLM's, `repeats` times): a load change on a shared machine hits both alike.
  ours_s, hflm_s, hflm = [], [], None
  with tempfile.TemporaryDirectory() as d:
    ev.export_hf(d, cfg, params, "gpt2")
    for _ in range(repeats):
      start = time.perf_counter()
      lm.loglikelihood(inst, disable_tqdm=True)
      ours_s.append(time.perf_counter() - start)
      if torch_python:
        hflm = _hflm_round(torch_python, d, reqs, batch_size)
        hflm_s.append(statistics.median(hflm["seconds"][1:]))
  warm = statistics.median(ours_s)
  rows["ours"] = {"requests_per_s": len(reqs) / warm, "seconds": warm, "first_call_seconds": first}
  if hflm is not None:
    secs = statistics.median(hflm_s)
    rows["hflm"] = {"requests_per_s": len(reqs) / secs, "seconds": secs, "torch": hflm["torch"]}
    rows["max_abs_loglik_diff"] = float(np.max(np.abs(np.asarray(ours) - np.asarray(hflm["logliks"]))))
  prompts = [tok.encode(c)[-64:] for c, _ in reqs[:gen_batch]]
  for use_cache in (True, False):
    # eos_id -1: never produced, so every row decodes gen_tokens tokens
    fn = lambda: decode.generate(cfg, params, prompts, gen_tokens, -1, use_cache=use_cache)  # noqa: E731
    first, warm = _median_time(fn, repeats)
    rows[f"decode_{'cache' if use_cache else 'no_cache'}"] = {
        "tokens_per_s": gen_batch * gen_tokens / warm,
        "seconds": warm,
        "first_call_seconds": first,
        "batch": gen_batch,
        "new_tokens": gen_tokens,
    }
  return rows


def table(rows: dict[str, Any]) -> str:
  lines = [
      f"model: {rows['model']}; {rows['requests']} loglikelihood requests (2-shot); {rows['devices']}",
      "| what | rate | median s | first call s |",
      "|---|---:|---:|---:|",
  ]
  for key, label in (("ours", "JaxLM.loglikelihood"), ("hflm", "HFLM.loglikelihood (torch)")):
    if key in rows:
      r = rows[key]
      lines.append(
          f"| {label} | {r['requests_per_s']:.1f} req/s | {r['seconds']:.3f} | {r.get('first_call_seconds', float('nan')):.2f} |"
      )
  for key, label in (("decode_cache", "decode, KV cache"), ("decode_no_cache", "decode, no cache")):
    r = rows[key]
    lines.append(
        f"| {label} (batch {r['batch']}, {r['new_tokens']} new) | {r['tokens_per_s']:.1f} tok/s | {r['seconds']:.3f} | {r['first_call_seconds']:.2f} |"
    )
  if "max_abs_loglik_diff" in rows:
    lines.append(f"max |loglik ours - HFLM| over the requests: {rows['max_abs_loglik_diff']:.2e}")
  return "\n".join(lines)
