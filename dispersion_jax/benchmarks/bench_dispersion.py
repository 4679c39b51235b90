"""Times the dispersion term alone: value+grad of `dispersion_loss`, jitted, for each impl, variant and block size
(command line: python -m dispersion_jax bench-dispersion, cli/bench_dispersion.py).

Each configuration is compiled once (compile time and XLA's memory analysis of value+grad are recorded: temp bytes
= the scratch the step needs besides its inputs and outputs), warmed up, then timed in interleaved rounds (one sample
of every configuration per round, so drifts of the machine hit all alike); a sample is `--inner` back-to-back calls
divided by `--inner`, alternating between two inputs. The median over rounds is reported. A configuration that
fails (e.g. the Pallas kernel on an unsupported jax) is recorded with its error and the rest still run.
"""

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dispersion_jax.errors import describe_failure
from dispersion_jax.losses import dispersion_pallas
from dispersion_jax.losses.dispersion import dispersion_loss
from dispersion_jax.losses.dispersion_pallas import KERNEL_VARIANTS

PRESETS = {"gpt2": (16, 1024, 768), "gpt2_b8": (8, 1024, 768), "cpu": (2, 512, 128), "cpu_small": (2, 256, 64)}


def machine() -> dict:
  d = jax.devices()[0]
  info = dict(
      backend=jax.default_backend(),
      device_kind=d.device_kind,
      device_count=jax.device_count(),
      jax=jax.__version__,
      python=platform.python_version(),
      processor=platform.processor(),
      machine=platform.machine(),
      cpu_count=os.cpu_count(),
  )
  try:
    import jaxlib

    info["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  return info


def _configs(args):
  for variant in args.variants:
    for impl in args.impls:
      if impl.startswith("pallas") and variant not in KERNEL_VARIANTS:
        continue
      if impl.startswith("pallas"):
        for tile_n in args.pallas_tile_n:
          yield dict(variant=variant, impl=impl, block_size=None, tile_n=tile_n)
      else:
        for bs in args.block_size:
          yield dict(variant=variant, impl=impl, block_size=bs)


def _compile(cfg, args, z):
  kw = dict(
      clamp_threshold=args.clamp_threshold, max_tokens=args.max_tokens, block_size=cfg["block_size"], impl=cfg["impl"]
  )
  key = jax.random.PRNGKey(0) if args.max_tokens else None
  fn = jax.jit(jax.value_and_grad(lambda z: dispersion_loss(z, cfg["variant"], key=key, **kw)))
  if "tile_n" in cfg:  # a module constant, read at trace time: retrace
    dispersion_pallas.TILE_N = cfg["tile_n"]
    jax.clear_caches()
  t = time.perf_counter()
  compiled = fn.lower(z).compile()
  row = dict(compile_s=time.perf_counter() - t)
  try:
    mem = compiled.memory_analysis()
    row.update(
        temp_bytes=int(mem.temp_size_in_bytes),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
    )
  except Exception:  # noqa: BLE001  (not every backend reports it)
    row.update(temp_bytes=None)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["flops"] = float(cost.get("flops", 0.0)) or None
  except Exception:  # noqa: BLE001
    row["flops"] = None
  return compiled, row


def run(args) -> dict:
  B, L, F = args.batch, args.seq, args.dim
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 1, F)).astype(np.float32)
  inputs = [jnp.asarray(base + rng.normal(size=(B, L, F)).astype(np.float32), args.dtype) for _ in range(2)]
  rows, fns = [], []
  for cfg in _configs(args):
    row = dict(
        cfg, batch=B, seq=L, dim=F, dtype=args.dtype, clamp_threshold=args.clamp_threshold, max_tokens=args.max_tokens
    )
    try:
      compiled, info = _compile(cfg, args, inputs[0])
      row.update(info)
      for _ in range(args.warmup):
        jax.block_until_ready(compiled(inputs[0]))
      row["loss"] = float(compiled(inputs[0])[0])
      fns.append((row, compiled))
    except Exception as ex:  # noqa: BLE001
      row["error"] = describe_failure(ex)
      print(f"[skip] {cfg}: {row['error']}", file=sys.stderr)
    row["samples_ms"] = []
    rows.append(row)
  for r in range(args.repeats):
    for row, compiled in fns:
      t = time.perf_counter()
      for i in range(args.inner):
        out = compiled(inputs[(r + i) % 2])
      jax.block_until_ready(out)
      row["samples_ms"].append((time.perf_counter() - t) / args.inner * 1e3)
  for row in rows:
    s = row["samples_ms"]
    if s:
      q = np.percentile(s, [25, 75])
      row.update(median_ms=statistics.median(s), min_ms=min(s), p25_ms=float(q[0]), p75_ms=float(q[1]))
  settings = {k: v for k, v in vars(args).items() if k != "json"}
  return dict(machine=machine(), settings=settings, rows=rows)


def table(result: dict) -> str:
  rows = result["rows"]
  ref = {(r["variant"], r["block_size"]): r.get("median_ms") for r in rows if r["impl"] == "reference"}
  ref_dense = {r["variant"]: r.get("median_ms") for r in rows if r["impl"] == "reference" and r["block_size"] is None}
  m = result["machine"]
  lines = [
      f"dispersion term, value+grad | {m['backend']} {m['device_kind']} | jax {m['jax']} | "
      f"B={rows[0]['batch']} L={rows[0]['seq']} F={rows[0]['dim']} {rows[0]['dtype']}"
      if rows
      else "",
      f"{'variant':20s} {'impl':10s} {'block':>6s} {'median ms':>10s} {'p25-p75 ms':>15s} {'vs ref':>7s} "
      f"{'temp MiB':>9s} {'compile s':>9s}",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['variant']:20s} {r['impl']:10s} {str(r['block_size']):>6s}  error: {r['error'][:70]}")
      continue
    base = ref.get((r["variant"], r["block_size"])) or ref_dense.get(r["variant"])
    speed = f"{base / r['median_ms']:.2f}x" if base else "-"
    temp = f"{r['temp_bytes'] / 2**20:.1f}" if r.get("temp_bytes") is not None else "-"
    impl = r["impl"] + (f"/{r['tile_n']}" if "tile_n" in r else "")
    lines.append(
        f"{r['variant']:20s} {impl:10s} {str(r['block_size']):>6s} {r['median_ms']:10.3f} "
        f"{r['p25_ms']:7.3f}-{r['p75_ms']:<7.3f} {speed:>7s} {temp:>9s} {r['compile_s']:9.2f}"
    )
  return "\n".join(lines)
