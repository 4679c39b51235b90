"""Checkpoint selection and aggregation over seeds, the pure half of the results table (research/results.py).

Rows are plain dicts {"name", "step", <group keys>, <metrics>}, one per evaluated checkpoint, so this runs without
training. One checkpoint per point (seed) is chosen by each of these rules (ties: the earliest step):
  last        the newest evaluated checkpoint (the final one unless a step filter leaves it out)
  val         the lowest validation loss over the point's checkpoints (val_loss from the run's own evaluation rows
              in metrics.jsonl at that step, else evaluate.perplexity on the same validation batches)
  test        the authors' rule: the highest mean of the test metrics (every task's acc) over the point's
              checkpoints. TEST-SET SELECTION: the examples that choose the checkpoint also score it, so the
              numbers are optimistic
  test_group  the authors' width-study aggregator: one step for the whole group, the highest mean over seeds of
              that mean (also test-set selection)

Per group of points, mean ± sample std (ddof 1) over the group's points (its seeds) of every metric, and each
group's difference to its reference group: the CE-only group, by default the one with dispersion.coeff == 0 and
baseline.method none (None counts as none) that shares the group's values of every other grouping key (so a width
study compares each width with the CE-only run of the same width); only reference keys that are grouping keys
take part.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dispersion_jax.errors import ConfigError

RULES = {
    "last": "the last checkpoint of each seed",
    "val": "each seed's checkpoint with the lowest validation loss",
    "test": "each seed's checkpoint with the highest mean task accuracy: TEST-SET SELECTION (the authors' rule; "
    "optimistic, the same examples choose the checkpoint and score it)",
    "test_group": "one step per group, the highest mean over seeds of the mean task accuracy: TEST-SET SELECTION "
    "(the authors' width-study aggregator; optimistic)",
}
DEFAULT_RULES = ("last", "val", "test")
DEFAULT_REFERENCE = {"dispersion.coeff": 0.0, "baseline.method": "none"}
_FIRST = ("train_ce", "val_loss", "val_ppl", "val_dispersion")
_LAST = ("mean_acc", "mean_acc_norm", "spearman", "kendall")


def _num(x: Any) -> float:
  if x is None or isinstance(x, bool):
    return float("nan")
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def selection_metrics(rows: Sequence[Mapping]) -> list[str]:
  """The authors' selection metrics: every task's accuracy (`acc/<task>`)."""
  return sorted({k for r in rows for k in r if k.startswith("acc/")})


def metric_columns(rows: Sequence[Mapping]) -> list[str]:
  """Every metric present, in a fixed order: losses, acc/<task>, acc_norm/<task>, means, condensation."""
  keys = {k for r in rows for k in r}
  return (
      [m for m in _FIRST if m in keys]
      + sorted(k for k in keys if k.startswith("acc/"))
      + sorted(k for k in keys if k.startswith("acc_norm/"))
      + [m for m in _LAST if m in keys]
  )


def _score(row: Mapping, metrics: Sequence[str]) -> float:
  v = [x for x in (_num(row.get(m)) for m in metrics) if math.isfinite(x)]
  return float(np.mean(v)) if v else float("nan")


def _by_point(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
  out: dict[str, list[Mapping]] = {}
  for r in rows:
    out.setdefault(r["name"], []).append(r)
  return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


def _best(rows: Sequence[Mapping], score: Callable[[Mapping], float], lower: bool) -> Mapping | None:
  """The row with the best finite score, the earliest step among ties; None if no score is finite."""
  best, best_v = None, None
  for r in sorted(rows, key=lambda r: r["step"]):
    v = score(r)
    if math.isfinite(v) and (best_v is None or (v < best_v if lower else v > best_v)):
      best, best_v = r, v
  return best


def group_key(row: Mapping, group_by: Sequence[str]) -> tuple:
  return tuple(row.get(k) for k in group_by)


def select(
    rows: Sequence[Mapping], rule: str, *, group_by: Sequence[str] = (), select_metrics: Sequence[str] | None = None
) -> list[dict]:
  """One row per point (`name`), chosen by `rule` (see RULES); each gets `selected_by` and, for the test rules,
  `selection_score`. A point with no usable row for the rule (no val_loss, no accuracy) is left out."""
  if rule not in RULES:
    raise ConfigError(f"unknown selection rule {rule!r}; use one of {', '.join(RULES)}")
  metrics = list(select_metrics) if select_metrics else selection_metrics(rows)
  missing = [m for m in metrics if not any(m in r for r in rows)]
  if missing:
    raise ConfigError(f"selection metric {missing[0]!r} is not in the evaluation rows (e.g. acc/<task>)")
  if rule.startswith("test") and not metrics:
    raise ConfigError("no test metric (acc/<task>) in the rows: evaluate with tasks, or drop the test rules")
  points = _by_point(rows)
  if rule == "test_group":
    groups: dict[tuple, list[list[Mapping]]] = {}
    for prow in points.values():
      groups.setdefault(group_key(prow[0], group_by), []).append(prow)
    chosen = []
    for members in groups.values():
      steps = sorted({r["step"] for m in members for r in m})
      means = []
      for s in steps:  # mean over the seeds that have this step, of each seed's mean test metric
        v = [x for m in members for r in m if r["step"] == s and math.isfinite(x := _score(r, metrics))]
        means.append(float(np.mean(v)) if v else float("nan"))
      ok = [i for i, v in enumerate(means) if math.isfinite(v)]
      if not ok:
        continue
      best = steps[max(ok, key=lambda i: (means[i], -i))]
      for m in members:
        chosen += [
            {**r, "selected_by": rule, "selection_score": means[steps.index(best)]} for r in m if r["step"] == best
        ]
    return sorted(chosen, key=lambda r: list(points).index(r["name"]))
  out = []
  for prow in points.values():
    if rule == "last":
      best = prow[-1]
    elif rule == "val":
      best = _best(prow, lambda r: _num(r.get("val_loss")), lower=True)
    else:
      best = _best(prow, lambda r: _score(r, metrics), lower=False)
    if best is not None:
      extra = {"selection_score": _score(best, metrics)} if rule == "test" else {}
      out.append({**best, "selected_by": rule, **extra})
  return out


def aggregate(rows: Sequence[Mapping], group_by: Sequence[str], metrics: Sequence[str] | None = None) -> list[dict]:
  """Per group (first-appearance order): n, the points and their steps, mean and sample std (ddof 1; NaN for one
  point) of each metric. A missing value is NaN and makes that group's mean NaN: nothing is averaged silently."""
  metrics = list(metrics) if metrics is not None else metric_columns(rows)
  groups: dict[tuple, list[Mapping]] = {}
  for r in rows:
    groups.setdefault(group_key(r, group_by), []).append(r)
  out = []
  for key, members in groups.items():
    g: dict[str, Any] = {
        **dict(zip(group_by, key)),
        "n": len(members),
        "points": [m["name"] for m in members],
        "steps": [m["step"] for m in members],
    }
    for m in metrics:
      v = np.asarray([_num(r.get(m)) for r in members], np.float64)
      g[m] = float(np.mean(v))
      g[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    out.append(g)
  return out


def parse_value(text: str) -> Any:
  """A reference value from the command line: a number if it reads as one, else the string."""
  try:
    return float(text)
  except ValueError:
    return text


def canonical(v: Any) -> Any:
  """A config value in the form grouping compares and orders: None and "none" alike, numbers as floats."""
  if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "")):
    return "none"
  if isinstance(v, bool):
    return v
  if isinstance(v, (int, float, np.integer, np.floating)):
    return float(v)
  if isinstance(v, str):
    try:
      return float(v)
    except ValueError:
      return v.strip().lower()
  return v


def same(a: Any, b: Any) -> bool:
  """Config values equal for grouping: numbers by value (0 == 0.0), strings case-insensitively, None == 'none'."""
  a, b = canonical(a), canonical(b)
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
  return a == b


def with_deltas(
    groups: Sequence[Mapping],
    group_by: Sequence[str],
    reference: Mapping[str, Any],
    metrics: Sequence[str] | None = None,
) -> list[dict]:
  """Each group plus `reference_group` (the key of its reference group, or None), `is_reference`, and
  `delta/<metric>` = its mean - the reference's mean. The reference of a group matches `reference` on the
  reference keys that are grouping keys and equals the group on the other grouping keys."""
  ref_keys = [k for k in reference if k in group_by]
  others = [k for k in group_by if k not in ref_keys]
  metrics = (
      list(metrics) if metrics is not None else [k for k in (groups[0] if groups else {}) if f"{k}_std" in groups[0]]
  )
  out = []
  for g in groups:
    ref = None
    if ref_keys:
      ref = next(
          (
              h
              for h in groups
              if all(same(h[k], reference[k]) for k in ref_keys) and all(same(h[k], g[k]) for k in others)
          ),
          None,
      )
    d = dict(g)
    d["is_reference"] = ref is g
    d["reference_group"] = None if ref is None else group_key(ref, group_by)
    for m in metrics:
      d[f"delta/{m}"] = float("nan") if ref is None else g[m] - ref[m]
    out.append(d)
  return out
