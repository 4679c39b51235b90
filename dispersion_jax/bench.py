"""python -m dispersion_jax.bench --layers 6 --dim 384 --heads 6 --seq 256 --batch 8 --json out.json [...]

Times the real compiled train step (`train_step` + `jit_train_step`: forward, backward, clipping, AdamW, donated
state) on a 1-device mesh: warm-up excluded, `jax.block_until_ready`, median over `--repeats`. Every list-valued
flag (`--batch 8,16 --variant angular_spread,decorrelation --block-size none,256`) is crossed with the others.

FLOPs per token (model FLOPs, the convention of docs/performance-notes.md):
  6 * (params - position table) + 6 * layers * seq * width
The dispersion's own FLOPs are not counted; its cost is `dispersion_overhead` = 1 - tok/s(coeff) / tok/s(coeff 0),
the coeff-0 step measured with the same settings. MFU = tokens/s * FLOPs/token / peak, peak = 989e12 (H100 bf16
datasheet) on GPU, on CPU a measured float32 matmul rate (or `--peak-flops`).
Peak memory: `compiled.memory_analysis()` temp + argument + output bytes (all live at once, donation aside) and,
on GPU, `device.memory_stats()["peak_bytes_in_use"]` (process-wide, so monotone across rows).
"""
import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dispersion_jax import config as config_lib
from dispersion_jax import sharding
from dispersion_jax.models import GPT, count_params
from dispersion_jax.models.gpt2 import PRESETS
from dispersion_jax.objective import DispersionConfig
from dispersion_jax.train_step import (init_state, jit_train_step, logical_context, lr_schedule, make_optimizer,
                                       state_shardings, train_step)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 datasheet numbers
LIST_FLAGS = ("preset", "layers", "dim", "heads", "vocab", "seq", "batch", "variant", "coeff", "max_tokens",
              "block_size", "ce_chunk", "remat", "scan", "dtype", "attention")


@dataclasses.dataclass(frozen=True)
class Setting:
  preset: str            # "" = the --layers/--dim/--heads shape
  layers: int
  dim: int
  heads: int
  vocab: int
  seq: int
  batch: int
  variant: str
  coeff: float
  max_tokens: int        # 0 = all tokens
  block_size: int        # 0 = dense dispersion
  ce_chunk: int          # 0 = plain logits + CE
  remat: str
  scan: bool
  dtype: str             # auto = bfloat16 on GPU, float32 on CPU
  attention: str         # auto = cuDNN on GPU, XLA elsewhere

  def shape(self) -> "Setting":
    if not self.preset:
      return self
    p = PRESETS[self.preset]
    return dataclasses.replace(self, layers=p["n_layer"], dim=p["n_embd"], heads=p["n_head"],
                               vocab=p.get("vocab_size", self.vocab))

  def baseline(self) -> "Setting":
    """The same step without dispersion (its variant / subsampling / blocking are then irrelevant)."""
    return dataclasses.replace(self, coeff=0.0, variant="-", max_tokens=0, block_size=0)


def train_config(s: Setting):
  cfg = config_lib.default_config()
  cfg.batch_size, cfg.seq_len = s.batch, s.seq
  cfg.model.preset = "gpt2"
  cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.vocab_size = s.layers, s.dim, s.heads, s.vocab
  cfg.model.n_positions = max(1024, s.seq)
  cfg.model.remat, cfg.model.scan_layers, cfg.model.dtype, cfg.model.attention = s.remat, s.scan, s.dtype, s.attention
  cfg.dispersion.variant = s.variant if s.coeff else "angular_spread"
  cfg.dispersion.coeff = s.coeff
  cfg.dispersion.clamp_threshold = 0.1  # the GPT-2 training script's value
  cfg.dispersion.max_tokens = s.max_tokens or None
  cfg.dispersion.block_size = s.block_size or None
  return cfg


def flops_per_token(s: Setting, n_params: int) -> float:
  return 6.0 * (n_params - max(1024, s.seq) * s.dim) + 6.0 * s.layers * s.seq * s.dim


def peak_flops(override: float | None) -> tuple[float, str]:
  if override:
    return override, "declared (--peak-flops)"
  dev = jax.devices()[0]
  for name, v in PEAK_FLOPS.items():
    if name in dev.device_kind:
      return v, f"{name} bf16 datasheet"
  n = 2048  # CPU (or unknown device): best of a few float32 matmuls
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
  return 2 * n ** 3 / best, f"measured float32 {n}^3 matmul on {dev.device_kind}"


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _batch(s: Setting, mesh) -> dict:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, s.vocab, (s.batch, s.seq + 1), dtype=np.int32)
  b = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((s.batch, s.seq), np.int32),
           positions=np.broadcast_to(np.arange(s.seq, dtype=np.int32), (s.batch, s.seq)))
  return jax.device_put({k: np.ascontiguousarray(v) for k, v in b.items()}, sharding.batch_sharding(mesh))


def prepare_jax(s: Setting, *, warmup: int, compile_only: bool) -> tuple[dict, Callable[[], Any] | None]:
  """Compile the step (and, unless compile_only, warm it up); returns (row, run-one-step-and-block)."""
  cfg = train_config(s)
  mesh = sharding.make_mesh(cfg, jax.devices()[:1])
  model_cfg = config_lib.model_config(cfg)
  disp = dataclasses.replace(config_lib.dispersion_config(cfg), ce_chunk=s.ce_chunk or None)
  model, tx, schedule = GPT(model_cfg), make_optimizer(cfg), lr_schedule(cfg)
  abstract, shard = state_shardings(model_cfg, tx, mesh)
  row: dict[str, Any] = dict(params=count_params(abstract.params), compute_dtype=model_cfg.dtype,
                             attention_impl=model_cfg.attention)
  with logical_context(mesh):
    step = jit_train_step(functools.partial(train_step, model=model, disp=disp, tx=tx, schedule=schedule,
                                            grad_accum=1), mesh, shard)
    batch = _batch(s, mesh)
    if compile_only:  # abstract state: nothing is allocated
      state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shard)
    else:
      state = jax.jit(lambda: init_state(model_cfg, tx, 0), out_shardings=shard)()
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    row["compile_s"] = time.perf_counter() - t0
  row.update(_memory(compiled))
  if compile_only:
    return row, None
  box = {"state": state}  # the state is donated: each call replaces it

  def one_step():
    box["state"], metrics = compiled(box["state"], batch)
    jax.block_until_ready((box["state"], metrics))
    row["loss"] = metrics["loss"]

  for _ in range(warmup):
    one_step()
  return row, one_step


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return dict(peak_memory_bytes=None)
  out = dict(temp_bytes=m.temp_size_in_bytes, argument_bytes=m.argument_size_in_bytes,
             output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes)
  out["peak_memory_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
  return out


def measure_pipeline(seq: int, batch: int, num_batches: int) -> float:
  from dispersion_jax.data import pipeline
  cfg = pipeline.minimal_config(seq_len=seq)
  pipeline.build_dataset(cfg)
  return pipeline.measure_throughput(cfg, batch, num_batches)


def _settings(args) -> list[Setting]:
  lists = {f: getattr(args, f) for f in LIST_FLAGS}
  out = []
  for values in itertools.product(*lists.values()):
    s = Setting(**dict(zip(lists, values))).shape()
    s = s.baseline() if s.coeff == 0.0 else s
    for t in (s.baseline(), s):  # the coeff-0 step comes first: dispersion_overhead needs it anyway
      if t not in out:
        out.append(t)
  return out


def time_interleaved(steps: list[Callable[[], Any]], repeats: int, steps_per_repeat: int) -> list[list[float]]:
  """Seconds per step of each callable, `repeats` samples each, timed in round-robin rounds: a load change on a
  shared machine hits every setting alike, so ratios (overheads, JAX / PyTorch) stay fair. Each sample follows one
  untimed step of the same callable: the first step after another executable pays for fresh memory (page faults on
  CPU, up to ~25% at these sizes), which a training loop, running one step over and over, never pays."""
  times = [[] for _ in steps]
  for _ in range(repeats):
    for fn, ts in zip(steps, times):
      fn()
      t0 = time.perf_counter()
      for _ in range(steps_per_repeat):
        fn()
      ts.append((time.perf_counter() - t0) / steps_per_repeat)
  return times


def run(args) -> list[dict]:
  peak, peak_src = peak_flops(args.peak_flops)
  settings = _settings(args)
  entries: list[tuple[str, Setting, dict, Callable | None]] = []   # (framework, setting, row, step)
  prepared: dict[tuple[str, Setting], dict] = {}

  def add(framework: str, s: Setting, prepare: Callable):
    if (framework, s) not in prepared:
      row, fn = prepare()
      prepared[(framework, s)] = row
      entries.append((framework, s, row, fn))

  torch_name = "torch-compile" if args.torch_compile else "torch-eager"
  for s in settings:
    add("jax", s, lambda: prepare_jax(s, warmup=args.warmup, compile_only=args.compile_only))
    if args.torch_baseline and not args.compile_only:
      from dispersion_jax import bench_torch
      t = _torch_setting(s)
      add(torch_name, t, lambda: bench_torch.prepare(
          layers=t.layers, dim=t.dim, heads=t.heads, vocab=t.vocab, seq=t.seq, batch=t.batch, variant=t.variant,
          coeff=t.coeff, max_tokens=t.max_tokens or None, compile=args.torch_compile, warmup=args.warmup,
          n_positions=max(1024, t.seq)))
  if not args.compile_only:
    secs = time_interleaved([fn for *_, fn in entries], args.repeats, args.steps_per_repeat)
    for (_, s, row, _), samples in zip(entries, secs):
      sec = statistics.median(samples)
      tps = s.batch * s.seq / sec
      row.update(step_ms=1e3 * sec, step_ms_samples=[round(1e3 * t, 1) for t in samples], tokens_per_s=tps,
                 mfu=tps * flops_per_token(s, row["params"]) / peak)
      row["loss"] = float(row["loss"]) if "loss" in row else None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # process-wide peak over every prepared setting
      for _, _, row, _ in entries:
        row["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]

  rows, pipe = [], {}
  common = {"device": jax.devices()[0].device_kind, "peak_flops": peak, "peak_flops_source": peak_src}
  for s in settings:
    r = {"framework": "jax", **dataclasses.asdict(s), **common, **prepared[("jax", s)]}
    rows.append(r)
    if args.compile_only:
      continue
    r["dispersion_overhead"] = 1 - r["tokens_per_s"] / prepared[("jax", s.baseline())]["tokens_per_s"]
    if args.data_batches:
      if (s.seq, s.batch) not in pipe:
        pipe[(s.seq, s.batch)] = measure_pipeline(s.seq, s.batch, args.data_batches)
      r["pipeline_tokens_per_s"] = pipe[(s.seq, s.batch)]
      r["pipeline_keeps_up"] = r["pipeline_tokens_per_s"] >= r["tokens_per_s"]
    if args.torch_baseline:
      t = _torch_setting(s)
      tr = {"framework": torch_name, **dataclasses.asdict(s), **common, **prepared[(torch_name, t)],
            "block_size": None, "ce_chunk": None, "remat": None, "scan": None, "attention": "sdpa"}
      tr["dispersion_overhead"] = 1 - tr["tokens_per_s"] / prepared[(torch_name, t.baseline())]["tokens_per_s"]
      r["jax_over_torch"] = r["tokens_per_s"] / tr["tokens_per_s"]
      rows.append(tr)
  return rows


def _torch_setting(s: Setting) -> Setting:
  return dataclasses.replace(s, block_size=0, ce_chunk=0, remat="none", scan=False)  # JAX-only options


_GIB = lambda b: f"{b / 2**30:.2f} GiB"
COLUMNS = (("framework", "{}"), ("preset", "{}"), ("compute_dtype", "{}"), ("layers", "{}"), ("dim", "{}"),
           ("batch", "{}"), ("seq", "{}"), ("variant", "{}"), ("coeff", "{:g}"), ("max_tokens", "{}"),
           ("block_size", "{}"), ("ce_chunk", "{}"), ("remat", "{}"), ("scan", "{:d}"),
           ("tokens_per_s", "{:,.0f}"), ("step_ms", "{:.1f}"), ("compile_s", "{:.1f}"), ("peak_memory_bytes", _GIB),
           ("temp_bytes", _GIB), ("mfu", "{:.1%}"), ("dispersion_overhead", "{:.1%}"), ("jax_over_torch", "{:.2f}"),
           ("pipeline_tokens_per_s", "{:,.0f}"))


def table(rows: list[dict]) -> str:
  """A markdown table; `-` where a row has no value."""
  cols = [(c, f) for c, f in COLUMNS if any(r.get(c) is not None for r in rows)]
  cell = lambda r, c, f: "-" if r.get(c) in (None, "") else f(r[c]) if callable(f) else f.format(r[c])
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(cell(r, c, f) for c, f in cols) + " |" for r in rows]
  return "\n".join(lines)


def _list(kind):
  def parse(text: str):
    return [kind(v) for v in text.split(",")]
  return parse


def _int_or_none(v: str) -> int:
  return 0 if v.lower() in ("none", "dense", "0") else int(v)


def parse_args(argv: list[str] | None = None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", type=_list(str), default=[""], help="gpt2, gpt2-medium, ... (overrides the shape)")
  p.add_argument("--layers", type=_list(int), default=[6])
  p.add_argument("--dim", type=_list(int), default=[384])
  p.add_argument("--heads", type=_list(int), default=[6])
  p.add_argument("--vocab", type=_list(int), default=[50257])
  p.add_argument("--seq", type=_list(int), default=[256])
  p.add_argument("--batch", type=_list(int), default=[8])
  p.add_argument("--variant", type=_list(str), default=["angular_spread"])
  p.add_argument("--coeff", type=_list(float), default=[0.1])
  p.add_argument("--max-tokens", dest="max_tokens", type=_list(int), default=[0], help="0 = all tokens")
  p.add_argument("--block-size", dest="block_size", type=_list(_int_or_none), default=[DispersionConfig().block_size],
                 help="dispersion row block; none = dense")
  p.add_argument("--ce-chunk", dest="ce_chunk", type=_list(_int_or_none), default=[0],
                 help="fused head + CE chunk in tokens; 0 = plain")
  p.add_argument("--remat", type=_list(str), default=["none"], help="none | full | dots")
  p.add_argument("--scan", type=_list(lambda v: bool(int(v))), default=[False], help="0 | 1 (scan_layers)")
  p.add_argument("--dtype", type=_list(str), default=["auto"])
  p.add_argument("--attention", type=_list(str), default=["auto"], help="auto | xla | cudnn")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps-per-repeat", dest="steps_per_repeat", type=int, default=1)
  p.add_argument("--compile-only", dest="compile_only", action="store_true",
                 help="lower + compile + memory_analysis, nothing allocated or run")
  p.add_argument("--torch-baseline", dest="torch_baseline", action="store_true",
                 help="also time HF GPT-2 + PyTorch dispersion (requirements-bench.txt)")
  p.add_argument("--torch-compile", dest="torch_compile", action="store_true")
  p.add_argument("--data-batches", dest="data_batches", type=int, default=0,
                 help="also measure the input pipeline alone over N batches")
  p.add_argument("--peak-flops", dest="peak_flops", type=float, default=None)
  p.add_argument("--json", default=None, help="write the rows here")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.torch_baseline:
    from dispersion_jax import bench_torch
    bench_torch._torch()  # fail in one line before compiling anything
  rows = run(args)
  print(table(rows))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
