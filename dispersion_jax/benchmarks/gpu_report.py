"""The GPU check's report (launch/gpu_check.sh; command line: python -m dispersion_jax gpu-report DIR): merge
the JSON of each benchmark run into one document and judge the rows against the performance targets.

Targets (issue 14, GPT-2 on one H100, seq 1024, bf16, angular_spread on all tokens of all hidden states):
- GPT-2 124M whole train step >= 600k tokens/s, the dispersion term <= 5 % of that step;
- GPT-2 355M >= 250k tokens/s.
"Share of the step" is `dispersion_overhead` = 1 - tok/s(with) / tok/s(without), the same run, the same settings
(research/bench.py). A target is "met" only from a measured row; a missing or failed row says so.
"""

import json
import os
from typing import Any

TARGET_124M_TOKENS_PER_S = 600_000
TARGET_DISPERSION_SHARE = 0.05
TARGET_355M_TOKENS_PER_S = 250_000


def load_runs(directory: str) -> dict[str, Any]:
  """{file stem: its JSON} for every *.json in `directory` (bench.py: a list of rows; bench_dispersion: a dict)."""
  runs = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as fh:
        runs[name[: -len(".json")]] = json.load(fh)
  return runs


def _jax_rows(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r.get("framework") == "jax"]


def _fastest(rows: list[dict]) -> dict | None:
  """The measured JAX row with dispersion of the highest tokens/s (the impl a user would pick)."""
  timed = [r for r in _jax_rows(rows) if r.get("coeff") and "tokens_per_s" in r]
  return max(timed, key=lambda r: r["tokens_per_s"], default=None)


def _fmt_tps(row: dict) -> str:
  if "error" in row:
    return f"failed: {row['error'][:60]}"
  return f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "not run"


def _verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
  if value is None:
    return "not measured"
  ok = value >= target if higher_is_better else value <= target
  return "met" if ok else "not met"


def step_table(rows: list[dict], title: str, target: float | None) -> list[str]:
  """One line per JAX row with dispersion (and its no-dispersion twin) plus the PyTorch rows of a bench.py run."""
  out = [
      f"### {title}",
      "",
      "| framework | attention | impl | tokens/s | step ms | MFU | dispersion share | vs target |",
  ]
  out.append("|---|---|---|---|---|---|---|---|")
  for r in rows:
    impl = (r.get("impl") or "-") if r.get("coeff") else "no dispersion"
    tps = r.get("tokens_per_s")
    share = r.get("dispersion_overhead")
    verdict = "-"
    if target is not None and r.get("framework") == "jax" and r.get("coeff"):
      verdict = _verdict(tps, target)
      if share is not None:
        verdict += f"; share {_verdict(share, TARGET_DISPERSION_SHARE, higher_is_better=False)}"
    out.append(
        "| "
        + " | ".join(
            [
                r.get("framework", "?"),
                str(r.get("attention_impl") or r.get("attention") or "-"),
                impl,
                _fmt_tps(r),
                f"{r['step_ms']:.1f}" if r.get("step_ms") else "-",
                f"{r['mfu']:.1%}" if r.get("mfu") else "-",
                f"{share:.1%}" if share is not None else "-",
                verdict,
            ]
        )
        + " |"
    )
  return out + [""]


def ratio(a: dict | None, b: dict | None) -> float | None:
  if not a or not b or a.get("tokens_per_s") is None or b.get("tokens_per_s") is None:
    return None
  return a["tokens_per_s"] / b["tokens_per_s"]


def _target_line(label: str, row: dict | None, target: float) -> str:
  if row is None:
    return f"- {label} tokens/s: not measured"
  return f"- {label} tokens/s: {_verdict(row['tokens_per_s'], target)} ({row['tokens_per_s']:,.0f}, impl {row['impl']})"


def summary(runs: dict[str, Any]) -> list[str]:
  """The verdicts, one line each: the targets, pallas vs xla, cuDNN vs XLA attention, JAX vs PyTorch."""
  lines = ["### Verdicts", ""]
  g = runs.get("bench_train_gpt2", [])
  best = _fastest(g)
  lines.append(
      _target_line(
          f"GPT-2 124M, all-token angular_spread, >= {TARGET_124M_TOKENS_PER_S:,}", best, TARGET_124M_TOKENS_PER_S
      )
  )
  share = best.get("dispersion_overhead") if best else None
  lines.append(
      f"- dispersion <= {TARGET_DISPERSION_SHARE:.0%} of that step: "
      + (f"{_verdict(share, TARGET_DISPERSION_SHARE, False)} ({share:.1%})" if share is not None else "not measured")
  )
  lines.append(
      _target_line(
          f"GPT-2 355M >= {TARGET_355M_TOKENS_PER_S:,}",
          _fastest(runs.get("bench_train_355m", [])),
          TARGET_355M_TOKENS_PER_S,
      )
  )
  for name in ("bench_train_gpt2", "bench_train_355m", "bench_train_qwen3"):
    rows = {r.get("impl"): r for r in _jax_rows(runs.get(name, [])) if r.get("coeff")}
    x = ratio(rows.get("pallas"), rows.get("xla"))
    lines.append(f"- {name}: pallas / xla whole step = " + (f"{x:.3f}" if x else "not measured"))
  term = runs.get("bench_dispersion", {}).get("rows", [])
  for variant in sorted({r["variant"] for r in term}):
    ms = {}
    for r in term:
      if r["variant"] == variant and r.get("median_ms"):
        key = r["impl"]
        ms[key] = min(ms.get(key, float("inf")), r["median_ms"])
    if ms:
      lines.append(
          f"- dispersion term alone, {variant} (value+grad, best block/tile): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(ms.items()))
      )
  att = {(r.get("attention"), bool(r.get("coeff"))): r for r in _jax_rows(runs.get("bench_attention", []))}
  for disp in (False, True):
    x = ratio(att.get(("cudnn", disp)), att.get(("xla", disp)))
    lines.append(
        f"- cuDNN / XLA attention, {'with' if disp else 'without'} dispersion: " + (f"{x:.3f}" if x else "not measured")
    )
  torch_rows = [r for r in g if r.get("framework", "").startswith("torch") and r.get("coeff")]
  if torch_rows and best:
    x = ratio(best, torch_rows[0])
    lines.append(f"- JAX (best impl) / PyTorch {torch_rows[0]['framework']}, with dispersion: {x:.2f}x" if x else "")
  return [l for l in lines if l] + [""]


def report(runs: dict[str, Any]) -> str:
  device = next((r.get("device") for rs in runs.values() if isinstance(rs, list) for r in rs if r.get("device")), None)
  lines = [f"## GPU check: {device or 'unknown device'}", ""]
  titles = {
      "bench_train_gpt2": ("GPT-2 124M, seq 1024, batch 16, bf16, cuDNN attention", TARGET_124M_TOKENS_PER_S),
      "bench_attention": ("GPT-2 124M: cuDNN vs XLA attention (impl xla)", None),
      "bench_train_355m": ("GPT-2 355M, seq 1024, batch 8, bf16", TARGET_355M_TOKENS_PER_S),
      "bench_train_qwen3": ("Qwen3 width_256, seq 1024, batch 16, bf16", None),
  }
  for name, (title, target) in titles.items():
    if isinstance(runs.get(name), list):
      lines += step_table(runs[name], title, target)
    else:
      lines += [f"### {title}", "", "not run (see steps.log)", ""]
  return "\n".join(lines + summary(runs))
