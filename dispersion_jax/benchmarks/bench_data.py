"""The data layer's benchmark (command line: python -m dispersion_jax bench-data, cli/bench_data.py).

Measures the data layer on the embedded default corpus (~2.1M GPT-2 tokens):
- build: tokens/s of a fresh build (tokenize + pack) per number of worker processes, and of a re-pack (new
  seq_len from the kept token files);
- read: tokens/s of the step-indexed loader per CPU core (one thread, numpy rows; then with global jax arrays;
  then with thread prefetch, as tokens per CPU-second). The run that also timed the retired online-packing
  pipeline beside it is docs/benchmarks/data_cpu_2core.json.
Prints a table and writes JSON with the machine (lscpu model name, nproc, load average).
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import inputs, loader, packed, token_files
from dispersion_jax.data.config import DataConfig


def _machine() -> dict:
  model = ""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
  except (OSError, subprocess.SubprocessError):
    pass
  return {
      "cpu_model": model,
      "nproc": os.cpu_count(),
      "load_average": list(os.getloadavg()),
      "python": platform.python_version(),
  }


def _read_rate(batches, steps: int, start: int = 0, *, global_arrays: bool) -> dict:
  """tokens per wall second and per CPU second of `steps` steps after one warm-up step."""
  fn = (lambda s: batches[s]) if global_arrays else batches.local_batch
  fn(start)
  wall, cpu = time.perf_counter(), time.process_time()
  for s in range(start + 1, start + 1 + steps):
    out = fn(s)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  if global_arrays:
    jax.block_until_ready(out)
  tokens = steps * batches.global_batch * batches.seq_len
  return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / max(cpu, 1e-9)}


def _threaded_rate(batches, steps: int) -> dict:
  it = batches.iter_from(0)
  next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    out = next(it)
  jax.block_until_ready(out)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  tokens = steps * batches.global_batch * batches.seq_len
  return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / max(cpu, 1e-9)}


def _per_worker_rate(work: str, seq_len: int) -> dict:
  """Stage A as one worker process runs it (one tokenizer thread), unit by unit in this process: the rate each
  build worker adds (a pool also pays ~1-3 s to start its processes)."""
  cfg = DataConfig(cache_dir=work)
  ident = packed.identify(cfg, tokenizer="gpt2", seq_len=seq_len)
  units = inputs.plan_units(cfg, ident.inputs)
  token_dir = ident.token_path(units)
  os.makedirs(token_dir, exist_ok=True)
  t0 = time.perf_counter()
  tokens = 0
  for i, u in enumerate(units):
    stats = token_files.tokenize_unit(
        {
            "index": i,
            "unit": u,
            "token_dir": token_dir,
            "dtype": ident.dtype,
            "tokenizer": "gpt2",
            "text_key": "text",
            "grouping": "row",
            "threads": False,
        }
    )
    tokens += sum(stats["tokens"].values())
  seconds = time.perf_counter() - t0
  return {
      "what": "tokenize only, 1 thread (per worker)",
      "workers": 1,
      "seconds": seconds,
      "tokens": tokens,
      "tokens_per_s": tokens / seconds,
  }


def run(args) -> dict:
  """args: json, workers ("1,2"), batch_sizes ("16,32"), seq_len, steps, read_threads, work_dir (cli/bench_data.py)."""
  work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_")
  results = {"machine": _machine(), "seq_len": args.seq_len, "build": [], "read": []}
  try:
    report = None
    for w in [int(x) for x in args.workers.split(",") if x]:
      cfg = DataConfig(cache_dir=os.path.join(work, f"build_w{w}"))
      report = build_lib.build(cfg, tokenizer="gpt2", seq_len=args.seq_len, workers=w, progress=False)
      results["build"].append(
          {
              "what": "build",
              "workers": w,
              "seconds": report.seconds,
              "tokens": sum(report.tokens.values()),
              "tokens_per_s": report.tokens_per_s,
          }
      )
    results["build"].append(_per_worker_rate(os.path.join(work, "per_worker"), args.seq_len))
    repack = build_lib.build(cfg, tokenizer="gpt2", seq_len=args.seq_len // 2, workers=1, progress=False)
    results["build"].append(
        {
            "what": "re-pack (new seq_len, no tokenizing)",
            "workers": 1,
            "seconds": repack.seconds,
            "tokens": sum(repack.tokens.values()),
            "tokens_per_s": repack.tokens_per_s,
        }
    )
    ds = packed.open_path(report.path)
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
      one = loader.TrainBatches(ds, global_batch=b, seed=0, sharding=sharding, read_threads=0)
      threaded = loader.TrainBatches(ds, global_batch=b, seed=0, sharding=sharding, read_threads=args.read_threads)
      row = {
          "batch": b,
          "new_numpy_1thread": _read_rate(one, args.steps, global_arrays=False),
          "new_global_arrays_1thread": _read_rate(one, args.steps, global_arrays=True),
          f"new_prefetch_{args.read_threads}threads": _threaded_rate(threaded, args.steps),
      }
      results["read"].append(row)
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)

  m = results["machine"]
  print(f"machine: {m['cpu_model']} x {m['nproc']} (load {', '.join(f'{x:.1f}' for x in m['load_average'])})")
  print(f"{'build':<40}{'workers':>8}{'seconds':>10}{'tokens/s':>14}")
  for r in results["build"]:
    print(f"{r['what']:<40}{r['workers']:>8}{r['seconds']:>10.2f}{r['tokens_per_s']:>14,.0f}")
  print(f"\nread, seq_len {args.seq_len}: tokens/s (tokens per CPU-second)")
  for r in results["read"]:
    for k, v in r.items():
      if k == "batch":
        continue
      cell = v.get("error") or f"{v['tokens_per_s']:>14,.0f} ({v['tokens_per_cpu_s']:,.0f}/cpu-s)"
      print(f"  batch {r['batch']:>3}  {k:<28}{cell}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
  return results
