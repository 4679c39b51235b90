"""grad_accum=auto: the largest micro-batch whose compiled train step fits the device, chosen before the first step.

Candidates are the accumulation counts a (ascending: largest micro-batch first) with batch_size % a == 0 and the
micro-batch batch_size / a divisible by the data-parallel size. Each is compiled for the run's devices (or the
dry run's target) and measured by the compiler's memory analysis (arguments + outputs - aliased + temp + code, per
device, dry_run_report.memory_per_device); the TPU compiler's out-of-memory refusal counts as "does not fit". The
first whose total is <= limit x (1 - grad_accum_headroom) is the choice. The limit: memory_limit_gb if set, else
the dry-run target's chip (compile/chips.py), else the device's own `bytes_limit` (memory_stats()).

The choice is logged with its memory and written to WORKDIR/grad_accum_auto.json; a resume (or a second dry run)
with that file reuses it without compiling again. The step is then exactly the step of the same grad_accum set by
hand (the config carries the integer from here on: checkpoints record it).
"""

import copy
import json
import os
import sys

import jax
from ml_collections import ConfigDict

from dispersion_jax.compile import dry_run, targets
from dispersion_jax.compile.chips import CHIPS
from dispersion_jax.errors import ConfigError
from dispersion_jax.parallel import backend

RECORD = "grad_accum_auto.json"
GIB = 2**30


def candidates(batch_size: int, data_parallel: int) -> list[int]:
  return [a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % data_parallel == 0]


def limit_bytes(cfg: ConfigDict, target: targets.Target | None) -> int:
  if cfg.memory_limit_gb is not None:
    return int(cfg.memory_limit_gb * GIB)
  if target is not None:
    return CHIPS[target.chip].hbm_bytes
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise ConfigError(
        f"grad_accum=auto: {jax.devices()[0].device_kind} reports no memory limit; set memory_limit_gb"
    )
  return int(stats["bytes_limit"])


def measure(cfg: ConfigDict, mesh, accum: int) -> int | None:
  """Per-device bytes of the compiled step with grad_accum=accum; None where the compiler refuses it (OOM)."""
  trial = copy.deepcopy(dry_run.compilable_here(cfg)[0])  # a deep copy keeps grad_accum's field type (int or str)
  trial.grad_accum = accum
  try:
    compiled, _, _ = dry_run.compile_train_step(trial, mesh)
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    return None
  return dry_run.memory_per_device(compiled)["total"]


def choose(cfg: ConfigDict, mesh, limit: int, measure_fn=measure) -> dict:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  budget = limit * (1 - cfg.grad_accum_headroom)
  tried = []
  for a in candidates(cfg.batch_size, dp):
    total = measure_fn(cfg, mesh, a)
    tried.append(dict(grad_accum=a, bytes=total))
    if total is not None and total <= budget:
      return dict(
          grad_accum=a, micro_batch=cfg.batch_size // a, bytes=total, limit_bytes=limit,
          headroom=cfg.grad_accum_headroom, batch_size=cfg.batch_size, tried=tried,
      )  # fmt: skip
  raise ConfigError(
      f"grad_accum=auto: no micro-batch of batch_size={cfg.batch_size} fits {budget / GIB:.2f} GiB per device "
      f"(limit {limit / GIB:.2f} GiB less {cfg.grad_accum_headroom:.0%} headroom), not even "
      f"{cfg.batch_size // tried[-1]['grad_accum']}; shard more (mesh.fsdp, mesh.tensor) or set model.remat=full"
  )


def describe(record: dict) -> str:
  def one(t):
    return f"{t['grad_accum']} (" + ("refused" if t["bytes"] is None else f"{t['bytes'] / GIB:.2f} GiB") + ")"

  return (
      f"grad_accum=auto: {record['grad_accum']} (micro-batch {record['micro_batch']}), {record['bytes'] / GIB:.2f} "
      f"GiB of {record['limit_bytes'] / GIB:.2f} GiB per device with {record['headroom']:.0%} headroom; "
      f"tried {', '.join(one(t) for t in record['tried'])}"
  )


def resolve(cfg: ConfigDict, workdir: str | None) -> ConfigDict:
  """cfg itself unless grad_accum == "auto"; else a copy with the chosen (or recorded) integer."""
  if cfg.grad_accum != "auto":
    return cfg
  path = os.path.join(workdir, RECORD) if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if record["batch_size"] != cfg.batch_size:
      raise ConfigError(
          f"grad_accum=auto: {path} chose for batch_size={record['batch_size']}, not {cfg.batch_size}; "
          "delete it to choose again"
      )
    _log(f"{describe(record)} (reused from {path})")
  else:
    target = dry_run.target_of(cfg)
    mesh = dry_run.make_mesh(cfg, target)
    with backend.compiling_for(target.platform if target else jax.default_backend()):
      record = choose(cfg, mesh, limit_bytes(cfg, target))
    _log(describe(record))
    if path and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path, "w") as f:
        json.dump(record, f, indent=1)
  out = copy.deepcopy(cfg)
  out.grad_accum = record["grad_accum"]
  return out


def _log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)
