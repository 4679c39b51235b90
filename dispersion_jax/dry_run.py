"""Compile-only mode (`--config.dry_run=True`): will this config fit, and how much work is a step?

Lowers and compiles the real train step for the configured mesh from abstract inputs (shapes, dtypes and
shardings only: no parameter is materialised, no data is read), then prints XLA's per-device memory analysis and
FLOP count. With `dry_run_memory_budget_gb > 0` it fails (ConfigError, one line) when a device needs more.
Simulate a big mesh on one CPU machine with XLA_FLAGS=--xla_force_host_platform_device_count=64.
"""

import math
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax import lora_run, sharding, train
from dispersion_jax.errors import ConfigError
from dispersion_jax.models import flops_per_token
from dispersion_jax.train_step import jit_train_step, logical_context, state_shardings

# The batch of data/loader.py: int32[batch, seq_len] each.
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions")
_GIB = 1024**3


def abstract_inputs(cfg: ConfigDict, model_cfg, tx, mesh):
  """(state, batch) as ShapeDtypeStructs carrying their shardings, and the state's shardings."""
  spec, _ = lora_run.setup(cfg, model_cfg)
  state, shard = state_shardings(model_cfg, tx, mesh, spec)  # jax.eval_shape: nothing allocated
  rows = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=rows) for k in BATCH_KEYS}
  return state, batch, shard


def compile_train_step(cfg: ConfigDict, mesh):
  """The compiled train step of `cfg` on `mesh`, the abstract state, and the compile time in seconds."""
  model_cfg = config_lib.model_config(cfg)
  fn, tx = train.step_function(cfg, model_cfg)
  state, batch, shard = abstract_inputs(cfg, model_cfg, tx, mesh)
  start = time.perf_counter()
  with logical_context(mesh):
    compiled = jit_train_step(fn, mesh, shard).lower(state, batch).compile()
  return compiled, state, time.perf_counter() - start


def memory_per_device(compiled) -> dict[str, int]:
  """Bytes per device from XLA's buffer assignment; `total` = what must fit at once."""
  m = compiled.memory_analysis()
  out = {
      "arguments": m.argument_size_in_bytes,
      "outputs": m.output_size_in_bytes,
      "aliased": -m.alias_size_in_bytes,  # donated state: outputs reuse the argument buffers
      "temp": m.temp_size_in_bytes,
      "generated code": m.generated_code_size_in_bytes,
  }
  out["total"] = sum(out.values())
  return out


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
  return float((cost or {}).get("flops", float("nan")))


def check_memory_budget(total_bytes: int, budget_gb: float | None) -> None:
  """ConfigError (one line) when a device needs more than `budget_gb` GiB; None (or 0) = no budget."""
  if budget_gb and total_bytes > budget_gb * _GIB:
    raise ConfigError(
        f"dry run: a device needs {total_bytes / _GIB:.2f} GiB > dry_run_memory_budget_gb={budget_gb:g}; shard more "
        "(mesh.fsdp, mesh.tensor), set model.remat=full, or lower batch_size / raise grad_accum"
    )


def dry_run(cfg: ConfigDict) -> dict[str, float]:
  """Compile, print the analysis (process 0), enforce the memory budget; returns the numbers (bytes, FLOPs)."""
  mesh = sharding.make_mesh(config_lib.mesh_config(cfg))
  model_cfg = config_lib.model_config(cfg)
  compiled, state, seconds = compile_train_step(cfg, mesh)
  mem = memory_per_device(compiled)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen)))
  n_dev = mesh.devices.size
  est = flops_per_token(model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
  flops = xla_flops(compiled)
  if jax.process_index() == 0:
    print(
        f"dry run: {n_params / 1e6:,.1f}M params ({model_cfg.n_layer} layers, width {model_cfg.n_embd}, "
        f"{model_cfg.dtype} compute), mesh {dict(mesh.shape)} = {n_dev} {jax.devices()[0].platform} devices, "
        f"batch {cfg.batch_size}x{cfg.seq_len}, grad_accum {cfg.grad_accum}, remat {model_cfg.remat}; "
        f"compiled in {seconds:.1f} s"
    )
    if state.frozen is not None:
      n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
      print(f"LoRA: {n_train / 1e6:,.2f}M trainable adapter params; the base is frozen (no gradients, no moments)")
    print("memory per device (GiB): " + ", ".join(f"{k} {v / _GIB:.3f}" for k, v in mem.items()))
    print(
        f"FLOPs per step per device: XLA {flops:.3e} (a scanned layer loop is counted once), model estimate "
        f"{est / n_dev:.3e} (models.flops_per_token; {est:.3e} for all devices)"
    )
  check_memory_budget(mem["total"], cfg.dry_run_memory_budget_gb)
  return {
      **{f"memory/{k}": float(v) for k, v in mem.items()},
      "xla_flops_per_device": flops,
      "model_flops_per_device": est / n_dev,
      "model_flops": est,
  }
