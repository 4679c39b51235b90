"""Times the real compiled train step (`train_step` + `jit_train_step`: forward, backward, clipping, AdamW, donated
state) on a 1-device mesh: warm-up excluded, `jax.block_until_ready`, median over repeats. Command line:
python -m dispersion_jax bench (cli/bench.py).

A benchmark point is a run config (the schema of config.py): a config file plus `--config.KEY=VALUE` overrides; a
comma-separated value (`--config.batch_size=8,16`) is an axis, and the axes are crossed by the sweep engine
(`sweep.expand`). Each point with `dispersion.coeff != 0` also gets its coeff-0 twin, the denominator of
`dispersion_overhead` = 1 - tok/s(coeff) / tok/s(coeff 0).

FLOPs per token: `models.flops_per_token` (the one convention, also the dry run's and the training log's).
MFU = tokens/s x FLOPs/token / peak; peak = the accelerator's bf16 datasheet number (train.PEAK_FLOPS), on CPU a
measured float32 matmul rate (or `peak_flops`). Peak memory: `dry_run.memory_per_device` (XLA's buffer assignment,
what must fit at once) and, on GPU, `device.memory_stats()["peak_bytes_in_use"]` (process-wide).
"""

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.compile.dry_run import memory_per_device
from dispersion_jax.errors import UserError, describe_failure
from dispersion_jax.models import count_params, flops_per_token
from dispersion_jax.parallel import sharding
from dispersion_jax.research import sweep
from dispersion_jax.training import lora_state, train
from dispersion_jax.training.train_step import init_state, jit_train_step, logical_context, state_shardings

# Row columns taken from each point's config (the names docs/benchmarks.md uses).
FIELDS = {
    "preset": "model.preset",
    "family": "model.family",
    "layers": "model.n_layer",
    "dim": "model.n_embd",
    "heads": "model.n_head",
    "vocab": "model.vocab_size",
    "seq": "seq_len",
    "batch": "batch_size",
    "variant": "dispersion.variant",
    "coeff": "dispersion.coeff",
    "max_tokens": "dispersion.max_tokens",
    "block_size": "dispersion.block_size",
    "impl": "dispersion.impl",
    "ce_chunk": "ce_chunk",
    "remat": "model.remat",
    "scan": "model.scan_layers",
    "dtype": "model.dtype",
    "attention": "model.attention",
}


@dataclasses.dataclass(frozen=True)
class Options:
  warmup: int = 1
  repeats: int = 5
  steps_per_repeat: int = 1
  compile_only: bool = False  # lower + compile + memory analysis; nothing allocated or run
  torch_baseline: bool = False  # also Hugging Face GPT-2 + a PyTorch dispersion loss (bench_torch.py)
  torch_compile: bool = False
  data_batches: int = 0  # also the input pipeline alone over this many batches
  peak_flops: float | None = None


def points(config_path: str, overrides: Sequence[tuple[str, str]]) -> list[ConfigDict]:
  """The crossed run configs, each preceded by its coeff-0 twin (once)."""
  fixed = {k: v for k, v in overrides if "," not in v}
  axes = {k: v.split(",") for k, v in overrides if "," in v}
  grid = sweep.expand({"base": config_path, "overrides": fixed, "axes": axes}, root="")
  out, seen = [], set()
  for p in grid:
    cfg = p.cfg
    if cfg.seq_len > (config_lib.model_config(cfg).n_positions or 0) and cfg.model.n_positions is None:
      cfg.model.n_positions = cfg.seq_len  # a longer sequence than the preset's table: grow it for the benchmark
    for c in (baseline(cfg), cfg):
      key = c.to_json()
      if key not in seen:
        seen.add(key)
        out.append(c)
  return out


def baseline(cfg: ConfigDict) -> ConfigDict:
  """The same step without dispersion (its variant / subsampling / blocking are then irrelevant)."""
  c = ConfigDict(cfg.to_dict())
  c.dispersion.coeff = 0.0
  c.dispersion.variant, c.dispersion.max_tokens, c.dispersion.block_size = "angular_spread", None, None
  c.dispersion.impl = "auto"
  return c


def describe(cfg: ConfigDict) -> dict[str, Any]:
  model_cfg = config_lib.model_config(cfg)
  row = {name: cfg[key.split(".")[0]][key.split(".")[1]] if "." in key else cfg[key] for name, key in FIELDS.items()}
  row.update(layers=model_cfg.n_layer, dim=model_cfg.n_embd, vocab=model_cfg.vocab_size, compute_dtype=model_cfg.dtype)
  row["lora_rank"] = cfg.lora.rank or None  # None: full fine-tuning
  if row["coeff"] == 0.0:
    row.update(variant="-", max_tokens=None, block_size=None, impl=None)
  return row


def peak_flops(override: float | None) -> tuple[float, str]:
  if override:
    return override, "declared (peak_flops)"
  dev = jax.devices()[0]
  peak = train.peak_flops()
  if peak:
    return peak, f"{dev.device_kind} bf16 datasheet"
  n = 2048  # CPU (or unknown device): best of a few float32 matmuls
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
  return 2 * n**3 / best, f"measured float32 {n}^3 matmul on {dev.device_kind}"


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _batch(cfg: ConfigDict, vocab: int, mesh) -> dict:
  rng = np.random.default_rng(0)
  b, s = cfg.batch_size, cfg.seq_len
  ids = rng.integers(0, vocab, (b, s + 1), dtype=np.int32)
  batch = dict(
      input_ids=ids[:, :-1],
      targets=ids[:, 1:],
      segment_ids=np.ones((b, s), np.int32),
      positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)),
  )
  return jax.device_put({k: np.ascontiguousarray(v) for k, v in batch.items()}, sharding.batch_sharding(mesh))


def prepare_jax(cfg: ConfigDict, opts: Options) -> tuple[dict, Callable[[], Any] | None]:
  """Compile the step (and, unless compile_only, warm it up); returns (row, run-one-step-and-block)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  model_cfg = config_lib.model_config(cfg)
  train_fn, tx = train.step_function(cfg, model_cfg)
  spec, _ = lora_state.setup(cfg, model_cfg)  # LoRA: params are the adapters, frozen the base
  abstract, shardings = state_shardings(model_cfg, tx, mesh, spec)
  row: dict[str, Any] = dict(
      params=count_params((abstract.params, abstract.frozen)),
      trainable_params=count_params(abstract.params),
      attention_impl=model_cfg.attention,
      flops_per_token=flops_per_token(model_cfg, cfg.seq_len),
  )
  with logical_context(mesh):
    step = jit_train_step(train_fn, mesh, shardings)
    batch = _batch(cfg, model_cfg.vocab_size, mesh)
    state = (
        abstract
        if opts.compile_only
        else jax.jit(lambda: init_state(model_cfg, tx, 0, lora_spec=spec), out_shardings=shardings)()
    )  # abstract: nothing allocated
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    row["compile_s"] = time.perf_counter() - t0
  mem = memory_per_device(compiled)
  row.update(peak_memory_bytes=mem["total"], temp_bytes=mem["temp"])
  if opts.compile_only:
    return row, None
  box = {"state": state}  # the state is donated: each call replaces it

  def one_step():
    box["state"], metrics = compiled(box["state"], batch)
    jax.block_until_ready((box["state"], metrics))
    row["loss"] = metrics["loss"]

  for _ in range(opts.warmup):
    one_step()
  return row, one_step


def prepare_torch(cfg: ConfigDict, opts: Options) -> tuple[dict, Callable[[], Any]]:
  from dispersion_jax.benchmarks import bench_torch  # noqa: PLC0415 - torch is an optional extra

  m, d = config_lib.model_config(cfg), config_lib.dispersion_config(cfg)
  return bench_torch.prepare(
      layers=m.n_layer,
      dim=m.n_embd,
      heads=m.n_head,
      vocab=m.vocab_size,
      seq=cfg.seq_len,
      batch=cfg.batch_size,
      variant=d.variant,
      coeff=d.coeff,
      max_tokens=d.max_tokens,
      compile=opts.torch_compile,
      warmup=opts.warmup,
      n_positions=m.n_positions,
      clamp_threshold=d.clamp_threshold,
  )


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


def measure_pipeline(cfg: ConfigDict, num_batches: int) -> float:
  """Tokens/s of the point's input pipeline alone (its dataset, seq_len, batch, read threads), global arrays
  included, after one warm-up batch."""
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  it = train.train_batches(cfg, train.open_data(cfg), mesh, 0).iter_from(0, num_batches + 1)
  jax.block_until_ready(next(it))
  t0 = time.perf_counter()
  for batch in it:
    jax.block_until_ready(batch)
  return num_batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def run(config_path: str, overrides: Sequence[tuple[str, str]], opts: Options) -> list[dict]:
  peak, peak_src = peak_flops(opts.peak_flops)
  cfgs = points(config_path, overrides)
  frameworks = ["jax"] + (
      ["torch-compile" if opts.torch_compile else "torch-eager"]
      if opts.torch_baseline and not opts.compile_only
      else []
  )
  entries, seen = [], set()  # (framework, config, row, step); the torch points once per distinct setting
  for cfg in cfgs:
    for fw in frameworks:
      point = cfg if fw == "jax" else torch_point(cfg)
      if (fw, point.to_json()) in seen:
        continue
      seen.add((fw, point.to_json()))
      try:
        row, fn = (prepare_jax if fw == "jax" else prepare_torch)(point, opts)
      except UserError:
        raise
      except Exception as ex:  # noqa: BLE001 - one point that cannot compile or run (a kernel on a new jax, OOM)
        row, fn = {"error": describe_failure(ex)}, None
        print(f"[skip] {fw} {describe(point)}: {row['error']}", file=sys.stderr)  # the other points still run
      entries.append((fw, point, {"framework": fw, **describe(point), **row}, fn))
  timed = [e for e in entries if e[3] is not None]
  if not opts.compile_only:
    secs = time_interleaved([fn for *_, fn in timed], opts.repeats, opts.steps_per_repeat)
    for (fw, cfg, row, _), samples in zip(timed, secs):
      sec = statistics.median(samples)
      tps = cfg.batch_size * cfg.seq_len / sec
      row.update(
          step_ms=1e3 * sec,
          step_ms_samples=[round(1e3 * t, 1) for t in samples],
          tokens_per_s=tps,
          mfu=tps * flops_per_token(config_lib.model_config(cfg), cfg.seq_len) / peak,
          loss=float(row["loss"]) if "loss" in row else None,
      )
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # process-wide peak over every prepared setting
      for _, _, row, _ in entries:
        row["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]
  common = {"device": jax.devices()[0].device_kind, "peak_flops": peak, "peak_flops_source": peak_src}
  by_key = {(fw, cfg.to_json()): row for fw, cfg, row, _ in entries}
  rows, pipe = [], {}
  for fw, cfg, row, _ in entries:
    row.update(common)
    rows.append(row)
    if fw != "jax":
      row.update(block_size=None, impl=None, ce_chunk=None, remat=None, scan=None, attention="sdpa")
    if opts.compile_only or "error" in row:
      continue
    twin = by_key.get((fw, baseline(cfg).to_json()), {})
    if "tokens_per_s" in twin:
      row["dispersion_overhead"] = 1 - row["tokens_per_s"] / twin["tokens_per_s"]
    if fw == "jax" and opts.data_batches:
      key = (cfg.seq_len, cfg.batch_size)
      if key not in pipe:
        pipe[key] = measure_pipeline(cfg, opts.data_batches)
      row.update(pipeline_tokens_per_s=pipe[key], pipeline_keeps_up=pipe[key] >= row["tokens_per_s"])
    torch_row = next((by_key.get((f, torch_point(cfg).to_json())) for f in frameworks[1:]), None)
    if fw == "jax" and torch_row is not None and "tokens_per_s" in torch_row:
      row["jax_over_torch"] = row["tokens_per_s"] / torch_row["tokens_per_s"]
  return rows


def torch_point(cfg: ConfigDict) -> ConfigDict:
  """The PyTorch baseline's point: the JAX-only settings (impl, blocks, fused CE, remat, scan, attention) left out."""
  c = ConfigDict(cfg.to_dict())
  c.dispersion.impl, c.dispersion.block_size, c.ce_chunk = "auto", None, None
  c.model.remat, c.model.scan_layers, c.model.attention = "none", False, "auto"
  return c


_GIB = lambda b: f"{b / 2**30:.2f} GiB"
COLUMNS = (
    ("framework", "{}"),
    ("preset", "{}"),
    ("compute_dtype", "{}"),
    ("layers", "{}"),
    ("dim", "{}"),
    ("batch", "{}"),
    ("seq", "{}"),
    ("variant", "{}"),
    ("coeff", "{:g}"),
    ("max_tokens", "{}"),
    ("block_size", "{}"),
    ("impl", "{}"),
    ("ce_chunk", "{}"),
    ("remat", "{}"),
    ("scan", "{:d}"),
    ("lora_rank", "{}"),
    ("trainable_params", "{:,}"),
    ("tokens_per_s", "{:,.0f}"),
    ("step_ms", "{:.1f}"),
    ("compile_s", "{:.1f}"),
    ("peak_memory_bytes", _GIB),
    ("temp_bytes", _GIB),
    ("mfu", "{:.1%}"),
    ("dispersion_overhead", "{:.1%}"),
    ("jax_over_torch", "{:.2f}"),
    ("pipeline_tokens_per_s", "{:,.0f}"),
    ("error", "{:.80}"),
)


def table(rows: list[dict]) -> str:
  """A markdown table; `-` where a row has no value."""
  cols = [(c, f) for c, f in COLUMNS if any(r.get(c) is not None for r in rows)]
  cell = lambda r, c, f: "-" if r.get(c) in (None, "") else f(r[c]) if callable(f) else f.format(r[c])
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(cell(r, c, f) for c, f in cols) + " |" for r in rows]
  return "\n".join(lines)
