"""What a compiled train step tells before anyone pays for the hardware: memory per device, whether it fits, FLOPs
and bytes, a roofline lower bound of the step time, and the collectives in the compiled program.

Pure functions of a compiled executable (jax.stages.Compiled) and the chip table (chips.py); dry_run.py compiles.
"""

import json
import math
import re

from dispersion_jax.compile.chips import Chip
from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import paths

GIB = 1024**3
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# How XLA's cost analysis counts loops: the body of a while loop (nn.scan over layers, grad_accum micro-batches)
# once, not once per iteration. Unrolled layers are all counted.
COUNTING = (
    "XLA cost analysis of the compiled per-device program; the body of a while loop (scan_layers=True, grad_accum "
    "> 1) is counted once, not per iteration, so scanned steps are undercounted; the collectives likewise. The "
    "dispersion term runs inside the layer loop (the final norm's layer after it): in scanned models its FLOPs/bytes "
    "share is that of about one layer"
)
_FIX = "shard more (mesh.fsdp, mesh.tensor), set model.remat=full, or lower batch_size / raise grad_accum"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_DTYPE_BYTES |= {"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
# `%name = SHAPE op(` or `ROOT %name = SHAPE op(`: SHAPE an array `bf16[8,128]{1,0}` or a tuple `(..., ...)`.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s(?P<op>[a-z\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e\d+m\d+(?:fn)?)?)\[([0-9,]*)\]")


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


def cost(compiled) -> dict[str, float]:
  """{"flops", "bytes accessed"} per device from the compiled program; NaN where the backend reports none (the
  CUDA compiler's compile-only executables report no cost analysis: use the lowered module's, see dry_run.py)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c  # older jax: one dict per program
  c = c or {}
  return {k: float(c.get(k, math.nan)) for k in ("flops", "bytes accessed")}


def _array_bytes(shape_text: str) -> list[float]:
  return [
      _DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
      for dt, dims in _ARRAY.findall(shape_text)
  ]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Count and bytes of each collective in compiled HLO text. Async pairs (`*-start` / `*-done`) count once, at
  the start; bytes = the collective's result buffers (for a start op's tuple of (operands, results[, contexts]):
  the results). Each instruction counts once where it appears (a loop body once, see COUNTING)."""
  out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    op = m.group("op")
    base = op.removesuffix("-start")
    if base not in out or op.endswith("-done"):
      continue
    sizes = [b for b in _array_bytes(m.group("shape")) if b]
    if op.endswith("-start") and m.group("shape").startswith("(") and base != "all-reduce":
      arrays = [b for b, text in zip(sizes, _ARRAY.findall(m.group("shape"))) if text[1]]  # drop scalar contexts
      sizes = arrays[len(arrays) // 2 :]
    out[base]["count"] += 1
    out[base]["bytes"] += float(sum(sizes))
  return out


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float | str]:
  """The step can take no less than its FLOPs at the chip's peak rate, nor its memory traffic at peak bandwidth."""
  compute = flops / chip.bf16_flops_per_s
  memory = bytes_accessed / chip.hbm_bytes_per_s
  return {
      "lower_bound_seconds": max(compute, memory),
      "compute_seconds": compute,
      "memory_seconds": memory,
      "bound_by": "compute" if compute >= memory else "memory",
      "note": "a lower bound from datasheet peaks (chips.py), never a measurement: real steps are slower",
  }


def fit(total_bytes: int, chip: Chip | None) -> dict[str, float | bool | None]:
  if chip is None:
    return {"capacity_bytes": None, "fits": None, "headroom_bytes": None, "headroom_fraction": None}
  head = chip.hbm_bytes - total_bytes
  return {
      "capacity_bytes": chip.hbm_bytes,
      "fits": head >= 0,
      "headroom_bytes": head,
      "headroom_fraction": head / chip.hbm_bytes,
  }


def share(full: dict[str, float], twin: dict[str, float]) -> dict[str, float]:
  """The dispersion term's share of each quantity: (step - its coeff-0 twin) / step."""
  return {k: (full[k] - twin[k]) / full[k] if full[k] else math.nan for k in full}


def not_fitting_error(report: dict) -> ConfigError | None:
  """The one-line error for a step that does not fit its target (or the user's budget), else None."""
  if report.get("compile_error"):
    return ConfigError(f"dry run: the {report['target']} compiler refused the step: {report['compile_error']}; {_FIX}")
  total = report["memory_per_device"]["total"]
  budget = report.get("memory_budget_gb")
  if budget and total > budget * GIB:
    return ConfigError(f"dry run: a device needs {total / GIB:.2f} GiB > dry_run_memory_budget_gb={budget:g}; {_FIX}")
  if report["fits"] is False:
    return ConfigError(
        f"dry run: a {report['target']} device ({report['device_kind']}) needs {total / GIB:.2f} GiB > "
        f"{report['capacity_bytes'] / GIB:.2f} GiB of HBM; {_FIX}"
    )
  return None


def write(report: dict, workdir: str) -> str:
  """WORKDIR/dry_run.json (a local path or gs://: one object written whole)."""
  target = paths.path(workdir, what="--workdir")
  target.mkdir(parents=True, exist_ok=True)
  target.joinpath("dry_run.json").write_text(json.dumps(report, indent=1, sort_keys=False, default=float))
  return paths.join(workdir, "dry_run.json")


def lines(r: dict) -> list[str]:
  """The printed report (the JSON has every number)."""
  if r.get("compile_error"):
    return [f"dry run: {r['target']} ({r['device_kind']}, mesh {r['mesh']}): does NOT fit: {r['compile_error']}"]
  m = r["model"]
  out = [
      f"dry run: {m['params'] / 1e6:,.1f}M params ({m['n_layer']} layers, width {m['n_embd']}, {m['dtype']} "
      f"compute, attention {m['attention']}{' (' + m['attention_note'] + ')' if m['attention_note'] else ''}, dispersion.impl {m['dispersion_impl']}), mesh {r['mesh']} = "
      f"{r['num_devices']} {r['platform']} devices ({r['target']}, {r['device_kind']}, {r['slices']} slice(s)/"
      f"node(s)), batch {r['batch_size']}x{r['seq_len']}, grad_accum {r['grad_accum']}, remat {m['remat']}; "
      f"compiled in {r['compile_seconds']:.1f} s",
      "memory per device (GiB): " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in r["memory_per_device"].items()),
  ]
  if m.get("lora_rank"):
    out.append(
        f"LoRA rank {m['lora_rank']}: {m['trainable_params'] / 1e6:,.2f}M trainable adapter params; the base is "
        "frozen (no gradients, no moments)"
    )
  if r["fits"] is not None:
    out.append(
        f"fits: {'yes' if r['fits'] else 'NO'}, {r['headroom_bytes'] / GIB:+.2f} GiB headroom of "
        f"{r['capacity_bytes'] / GIB:.2f} GiB ({r['headroom_fraction']:+.0%})"
    )
  out.append(
      f"FLOPs per step per device: XLA {r['flops_per_device']:.3e} (a scanned layer loop is counted once), model "
      f"estimate {r['model_flops_per_device']:.3e} (models.flops_per_token; {r['model_flops']:.3e} for all devices); "
      f"bytes accessed {r['bytes_accessed_per_device']:.3e}"
  )
  if r.get("roofline"):
    b = r["roofline"]
    out.append(
        f"step time >= {b['lower_bound_seconds'] * 1e3:.2f} ms (roofline LOWER BOUND from peaks, not a measurement: "
        f"compute {b['compute_seconds'] * 1e3:.2f} ms, memory {b['memory_seconds'] * 1e3:.2f} ms)"
    )
  found = [f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in r["collectives"].items() if v["count"]]
  out.append("collectives per device (a loop body once): " + (", ".join(found) or "none"))
  if r.get("dispersion"):
    s = r["dispersion"]["share"]
    out.append(
        f"dispersion term (vs the coeff-0 twin): {s['flops']:+.1%} FLOPs, {s['bytes accessed']:+.1%} bytes, "
        f"{s['temp']:+.1%} temp memory"
    )
  return out
