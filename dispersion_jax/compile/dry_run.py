"""Compile-only mode (`--config.dry_run=True`): will this config fit, and how much work is a step?

Lowers and compiles the real train step from abstract inputs (shapes, dtypes and shardings only: no parameter is
materialised, no data is read), for the local devices or, with `dry_run_target=NAME`, for a TPU slice or GPU
node by its compiler (targets.py; the `compile` extra), then prints a report and writes WORKDIR/dry_run.json
(dry_run_report.py). On a target, every backend-dependent default (bf16 compute, cuDNN attention, the dispersion
kernel) resolves for the target (backend.compiling_for), and the mesh keys apply to its devices as on the real
slice: slice-/node-aware, data parallelism across slices. A step that does not fit the target's memory (or
`dry_run_memory_budget_gb`) is a one-line ConfigError after the report is written.
Simulate a big CPU mesh instead with XLA_FLAGS=--xla_force_host_platform_device_count=64.
"""

import copy
import ctypes.util
import importlib.util
import math
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.compile import dry_run_report as report_lib
from dispersion_jax.compile import targets
from dispersion_jax.compile.chips import CHIPS, table
from dispersion_jax.compile.dry_run_report import memory_per_device  # noqa: F401 - research.bench imports it here
from dispersion_jax.losses.dispersion import resolve_impl
from dispersion_jax.models import count_params, flops_per_token, param_shapes
from dispersion_jax.models.attention import resolve_attention
from dispersion_jax.parallel import backend, sharding
from dispersion_jax.training import lora_state, train
from dispersion_jax.training.train_step import jit_train_step, logical_context, state_shardings

# The batch of data/loader.py: int32[batch, seq_len] each.
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions")


def abstract_inputs(cfg: ConfigDict, model_cfg, tx, mesh):
  """(state, batch) as ShapeDtypeStructs carrying their shardings, and the state's shardings."""
  spec, _ = lora_state.setup(cfg, model_cfg)  # LoRA: adapters train, the frozen base holds no gradient or moments
  state, shard = state_shardings(model_cfg, tx, mesh, spec)  # jax.eval_shape: nothing allocated
  rows = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=rows) for k in BATCH_KEYS}
  return state, batch, shard


def target_of(cfg: ConfigDict) -> targets.Target | None:
  return targets.parse(cfg.dry_run_target, cfg.dry_run_slices) if cfg.dry_run_target else None


def num_devices(cfg: ConfigDict) -> int:
  """The devices the step is built for: the target's, else the machine's (what config.validate checks against)."""
  target = target_of(cfg) if cfg.dry_run else None
  return target.num_devices if target else jax.device_count()


def make_mesh(cfg: ConfigDict, target: targets.Target | None = None):
  if target is None:
    return sharding.make_mesh(config_lib.mesh_config(cfg))
  devices = targets.devices(target)
  return sharding.make_mesh(config_lib.mesh_config(cfg), devices, targets.granules(target, devices))


def compile_train_step(cfg: ConfigDict, mesh):
  """The compiled train step of `cfg` on `mesh`, the abstract state, and the compile time in seconds.
  Call inside backend.compiling_for(...) for a target's devices."""
  model_cfg = config_lib.model_config(cfg)
  fn, tx = train.step_function(cfg, model_cfg)
  state, batch, shard = abstract_inputs(cfg, model_cfg, tx, mesh)
  start = time.perf_counter()
  with logical_context(mesh):
    compiled = jit_train_step(fn, mesh, shard).lower(state, batch).compile()
  return compiled, state, time.perf_counter() - start


def compilable_here(cfg: ConfigDict) -> tuple[ConfigDict, str | None]:
  """(the config this machine can compile, a note or None). cuDNN's attention is traced and compiled by the cuDNN
  library: without it, XLA's attention is compiled instead, and the note says so (it materialises the LxL scores:
  more temp memory than the real run). Call inside backend.compiling_for(...)."""
  model_cfg = config_lib.model_config(cfg)
  if resolve_attention(model_cfg.attention, model_cfg.dtype, cfg.seq_len) != "cudnn" or _has_cudnn():
    return cfg, None
  cfg = copy.deepcopy(cfg)
  cfg.model.attention = "xla"
  return cfg, "compiled here as xla: no libcudnn on this machine, so temp memory is overestimated"


def _has_cudnn() -> bool:
  """Whether cuDNN's library can be found here (the nvidia-cudnn wheel of jax[cuda12], or the system's)."""
  try:
    wheel = importlib.util.find_spec("nvidia.cudnn") is not None
  except ModuleNotFoundError:
    wheel = False
  return wheel or ctypes.util.find_library("cudnn") is not None


def _cost(compiled) -> dict[str, float]:
  """FLOPs and bytes accessed per device. The CUDA compiler's compile-only executables report none: XLA's cost
  analysis then runs on their optimised HLO module (the same per-device program) through the CPU client."""
  c = report_lib.cost(compiled)
  if math.isnan(c["flops"]):
    try:
      from jax._src.lib import _jax  # noqa: PLC0415 - private (jax 0.10): the one entry to HloCostAnalysis

      (module,) = compiled.runtime_executable().hlo_modules()
      found = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
      c = {k: float(found.get(k, math.nan)) for k in c}
    except (ImportError, AttributeError, ValueError, RuntimeError):
      pass  # left NaN: the report says so
  return c


def _numbers(cfg: ConfigDict, mesh) -> dict:
  start = time.perf_counter()
  try:
    compiled, state, seconds = compile_train_step(cfg, mesh)
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that overflows HBM
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    return dict(error=str(e).splitlines()[0].rstrip("."), seconds=time.perf_counter() - start)
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))  # LoRA: the adapters only
  return dict(
      trainable_params=trainable,
      memory=memory_per_device(compiled),
      cost=_cost(compiled),
      collectives=report_lib.collectives(compiled.as_text()),
      seconds=seconds,
  )


def build_report(cfg: ConfigDict, target: targets.Target | None, mesh, twin: bool = True) -> dict:
  """Compile the step (and its coeff-0 twin when the term is on) and assemble the report (every key JSON-ready)."""
  platform = target.platform if target else jax.default_backend()
  with backend.compiling_for(platform):
    model_cfg = config_lib.model_config(cfg)
    disp = config_lib.dispersion_config(cfg)
    impl = resolve_impl(disp.impl, disp.variant)
    attention = resolve_attention(model_cfg.attention, model_cfg.dtype, cfg.seq_len)
    cfg, note = compilable_here(cfg)
    full = _numbers(cfg, mesh)
    twin_numbers = None
    if twin and disp.coeff != 0 and "error" not in full:
      zero = copy.deepcopy(cfg)
      zero.dispersion.coeff = 0.0
      twin_numbers = _numbers(zero, mesh)
  chip = CHIPS[target.chip] if target else None
  devices = mesh.devices.reshape(-1)
  r = dict(
      target=target.name if target else "local",
      platform=platform,
      device_kind=devices[0].device_kind,
      num_devices=int(devices.size),
      slices=target.slices if target else 1,
      topology=target.topology if target else None,
      mesh=dict(mesh.shape),
      batch_size=cfg.batch_size,
      seq_len=cfg.seq_len,
      grad_accum=cfg.grad_accum,
      model=dict(
          family=cfg.model.family,
          params=count_params(param_shapes(model_cfg)),
          n_layer=model_cfg.n_layer,
          n_embd=model_cfg.n_embd,
          dtype=model_cfg.dtype,
          remat=model_cfg.remat,
          scan_layers=model_cfg.scan_layers,
          attention=attention,
          attention_note=note,
          dispersion_impl=impl,
          dispersion_coeff=disp.coeff,
          lora_rank=config_lib.lora_config(cfg).rank,
      ),
      compile_seconds=full["seconds"],
      memory_budget_gb=cfg.dry_run_memory_budget_gb,
  )
  if "error" in full:  # the compiler refused the step for lack of memory: its message, no analysis
    return {**r, "compile_error": full["error"], "capacity_bytes": chip.hbm_bytes, "fits": False, "chips": table()}
  est = flops_per_token(model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
  r["model"]["trainable_params"] = full["trainable_params"]
  r.update(
      memory_per_device=full["memory"],
      **report_lib.fit(full["memory"]["total"], chip),
      flops_per_device=full["cost"]["flops"],
      bytes_accessed_per_device=full["cost"]["bytes accessed"],
      cost_counting=report_lib.COUNTING,
      model_flops_per_device=est / devices.size,
      model_flops=est,
      roofline=None,
      collectives=full["collectives"],
      dispersion=None,
      chips=table(),
  )
  if chip:
    # The model estimate counts every layer; XLA's count a scanned layer once: the larger is still a lower bound.
    r["roofline"] = report_lib.roofline(
        max(r["flops_per_device"], r["model_flops_per_device"]), r["bytes_accessed_per_device"], chip
    )
  if twin_numbers:
    mine = {**full["cost"], "temp": full["memory"]["temp"]}
    theirs = {**twin_numbers["cost"], "temp": twin_numbers["memory"]["temp"]}
    r["dispersion"] = dict(
        twin={"flops": theirs["flops"], "bytes accessed": theirs["bytes accessed"], "temp": theirs["temp"]},
        twin_compile_seconds=twin_numbers["seconds"],
        share=report_lib.share(mine, theirs),
    )
  return r


def dry_run(cfg: ConfigDict, workdir: str | None = None) -> dict:
  """Compile, print the report (process 0), write WORKDIR/dry_run.json, then fail (ConfigError, one line) if the
  step does not fit; returns the report."""
  target = target_of(cfg)
  mesh = make_mesh(cfg, target)
  r = build_report(cfg, target, mesh, twin=cfg.dry_run_twin)
  if jax.process_index() == 0:
    print("\n".join(report_lib.lines(r)), flush=True)
    if workdir:
      print(f"report: {report_lib.write(r, workdir)}", flush=True)
  error = report_lib.not_fitting_error(r)
  if error:
    raise error
  return r
