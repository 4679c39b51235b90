"""The results table of a finished sweep (command line: python -m dispersion_jax.cli.results).

Per group of points (default: the sweep's axes except seed, e.g. baseline.method and dispersion.coeff; any run
config keys with group_by), mean ± sample std (ddof 1) over the group's points (its seeds) of every evaluation
metric, and each group's difference to its reference group, as Markdown and LaTeX (booktabs). The reference is
the CE-only group: by default the one with dispersion.coeff == 0 and baseline.method none (None counts as none)
that shares the group's values of every other grouping key (so a width study compares each width with the CE-only
run of the same width); only reference keys that are grouping keys take part.

One checkpoint per point (seed) is reported, chosen by each of these rules (ties: the earliest step):
  last        the newest evaluated checkpoint (the final one unless a step filter leaves it out)
  val         the lowest validation loss over the point's checkpoints (val_loss from the run's own evaluation rows
              in metrics.jsonl at that step, else evaluate.perplexity on the same validation batches)
  test        the authors' rule: the highest mean of the test metrics (every task's acc) over the point's
              checkpoints. TEST-SET SELECTION: the examples that choose the checkpoint also score it, so the
              numbers are optimistic
  test_group  the authors' width-study aggregator: one step for the whole group, the highest mean over seeds of
              that mean (also test-set selection)

This needs every checkpoint evaluated: `evaluate_checkpoint` (validation loss, the multiple-choice tasks, the
condensation statistics of sweep.evaluate_point) caches each point + step + settings in
POINT/results_eval/<key>/step_<N>.json; `max_checkpoints` / `steps` limit the cost. The table logic (select,
aggregate, with_deltas, to_markdown, to_latex) takes plain rows {"name", "step", <group keys>, <metrics>}, so it
runs without training. A sweep keeps every checkpoint with "max_to_keep": None in its overrides (the default keeps
3; a pruned point is reported). Several sweep configs run in one sweep_dir (e.g. a dispersion.coeff sweep and a
baseline.method sweep, since baselines are CE only) are tabulated together; a run seen twice counts once.
"""

import csv
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from dispersion_jax import config as config_lib
from dispersion_jax.errors import ConfigError, DataError
from dispersion_jax.research import condensation_training as ct
from dispersion_jax.research import evaluate, sweep
from dispersion_jax.research.condensation_report import corpus_texts
from dispersion_jax.tokenizer import get_tokenizer

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
_EVAL_VERSION = 1  # bump when a checkpoint's evaluation row changes meaning
_TAIL = 5  # train_ce: mean CE of the last 5 logged steps up to the checkpoint
_FIRST = ("train_ce", "val_loss", "val_ppl", "val_dispersion")
_LAST = ("mean_acc", "mean_acc_norm", "spearman", "kendall")


# ------------------------------------------------------------------------------------------------ pure table logic
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


def _norm(v: Any) -> Any:
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
  a, b = _norm(a), _norm(b)
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


# ------------------------------------------------------------------------------------------------ formatting
def display(metric: str) -> tuple[str, float, int, bool]:
  """(header, scale, decimals, signed) of a metric's cells: accuracies in percent."""
  if metric.startswith(("acc/", "acc_norm/")) or metric in ("mean_acc", "mean_acc_norm"):
    return f"{metric} (%)", 100.0, 1, False
  if metric in ("spearman", "kendall"):
    return metric, 1.0, 2, True
  if metric == "val_ppl":
    return metric, 1.0, 1, False
  return metric, 1.0, 3, False


def _fmt(x: float, decimals: int, signed: bool = False) -> str:
  if x is None or not math.isfinite(x):
    return "n/a"
  return f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"


def cell_parts(g: Mapping, metric: str) -> tuple[str, str | None, str | None]:
  """(mean, std or None, delta or None) as text, scaled for display."""
  _, scale, dec, signed = display(metric)
  mean = _fmt(g.get(metric, float("nan")) * scale, dec, signed)
  std = g.get(f"{metric}_std", float("nan"))
  std = None if not math.isfinite(std) else _fmt(std * scale, dec)
  delta = g.get(f"delta/{metric}")
  delta = None if delta is None or not math.isfinite(delta) or g.get("is_reference") else _fmt(delta * scale, dec, True)
  return mean, std, delta


def _key_text(v: Any) -> str:
  return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _steps_text(steps: Sequence[int]) -> str:
  return ", ".join(str(s) for s in steps)


def _mark_column(group_by: Sequence[str], tables: Mapping[str, Sequence[Mapping]]) -> int:
  """The column that carries the reference marker: the first grouping key the reference groups share a value of
  (e.g. dispersion.coeff = 0), else the last."""
  refs = [g for groups in tables.values() for g in groups if g.get("is_reference")]
  for i, k in enumerate(group_by):
    if refs and all(same(g[k], refs[0][k]) for g in refs):
      return i
  return max(len(group_by) - 1, 0)


def to_markdown(
    tables: Mapping[str, Sequence[Mapping]], group_by: Sequence[str], metrics: Sequence[str], title: str = "Results"
) -> str:
  """One table per selection rule; a cell reads `mean ± std (Δ vs reference)`."""
  lines = [
      f"# {title}",
      "",
      "Mean ± sample std over seeds (ddof 1); in brackets the difference to the group's CE-only reference "
      "(marked *ref*). Accuracies in percent. `steps`: the checkpoint chosen for each seed.",
      "",
  ]
  mark = _mark_column(group_by, tables)
  for rule, groups in tables.items():
    lines += [f"## Checkpoint selection `{rule}`: {RULES[rule]}", ""]
    head = [*group_by, "n", "steps", *(display(m)[0] for m in metrics)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
      keys = [
          _key_text(g[k]) + (" *ref*" if g.get("is_reference") and i == mark else "") for i, k in enumerate(group_by)
      ]
      cells = []
      for m in metrics:
        mean, std, delta = cell_parts(g, m)
        cells.append(mean + (f" ± {std}" if std else "") + (f" ({delta})" if delta else ""))
      lines.append("| " + " | ".join([*keys, str(g["n"]), _steps_text(g["steps"]), *cells]) + " |")
    lines.append("")
  return "\n".join(lines)


_TEX_ESCAPE = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
  return "".join(_TEX_ESCAPE.get(c, c) for c in str(text))


def to_latex(tables: Mapping[str, Sequence[Mapping]], group_by: Sequence[str], metrics: Sequence[str]) -> str:
  """One booktabs table per selection rule (needs \\usepackage{booktabs})."""
  out = ["% Generated by dispersion_jax.research.results; needs \\usepackage{booktabs}.", ""]
  mark = _mark_column(group_by, tables)
  for rule, groups in tables.items():
    cols = "l" * len(group_by) + "rr" + "c" * len(metrics)
    out += [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{Mean $\pm$ std over seeds; in brackets the difference to the CE-only reference. "
        rf"Checkpoint selection \texttt{{{tex_escape(rule)}}}: {tex_escape(RULES[rule])}.}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join([*(tex_escape(k) for k in group_by), "$n$", "steps", *(tex_escape(display(m)[0]) for m in metrics)])
        + r" \\",
        r"\midrule",
    ]
    for g in groups:
      keys = [tex_escape(_key_text(g[k])) for k in group_by]
      if g.get("is_reference") and keys:
        keys[mark] += " (ref)"
      cells = []
      for m in metrics:
        mean, std, delta = cell_parts(g, m)
        c = f"${mean}" + (rf" \pm {std}" if std else "") + "$"
        cells.append(c.replace("$n/a$", "n/a") + (rf" {{\scriptsize$({delta})$}}" if delta else ""))
      out.append(" & ".join([*keys, str(g["n"]), tex_escape(_steps_text(g["steps"])), *cells]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
  return "\n".join(out)


def _value_order(v: Any) -> tuple:
  n = _norm(v)
  return (0, n, "") if isinstance(n, float) else (1, 0.0, str(n))


def order_groups(groups: Sequence[Mapping], group_by: Sequence[str], reference: Mapping[str, Any]) -> list[dict]:
  """Sorted by the grouping keys in their order, numbers by value; on a reference key its reference value first
  (e.g. model.n_inner, dispersion.coeff: 64/0 (ref), 64/0.1, 256/0, ...)."""

  def key(g):
    return tuple((0 if k in reference and same(g[k], reference[k]) else 1, *_value_order(g[k])) for k in group_by)

  return sorted(groups, key=key)


def build_tables(
    rows: Sequence[Mapping],
    group_by: Sequence[str],
    *,
    rules: Sequence[str] = DEFAULT_RULES,
    reference: Mapping[str, Any] = DEFAULT_REFERENCE,
    metrics: Sequence[str] | None = None,
    select_metrics: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
  """rule -> groups with deltas, from per-checkpoint rows (the whole pure pipeline)."""
  metrics = list(metrics) if metrics is not None else metric_columns(rows)
  tables = {}
  for rule in rules:
    chosen = select(rows, rule, group_by=group_by, select_metrics=select_metrics)
    tables[rule] = order_groups(
        with_deltas(aggregate(chosen, group_by, metrics), group_by, reference, metrics), group_by, reference
    )
  return tables


# ------------------------------------------------------------------------------------------------ evaluation
def config_value(p: sweep.Point, key: str) -> Any:
  """A point's value of any run config key (None where the config has no such key)."""
  if key in p.values:
    return p.values[key]
  return traverse_util.flatten_dict(p.cfg.to_dict(), sep=".").get(key)


def check_keys(keys: Sequence[str]) -> None:
  known = set(traverse_util.flatten_dict(config_lib.default_config().to_dict(), sep="."))
  for k in keys:
    if k not in known and k != "seed":
      raise ConfigError(f"group_by key {k!r} is not a run config key (e.g. dispersion.coeff, model.n_inner)")


def _metric_rows(workdir: str) -> tuple[dict[int, dict], dict[int, dict]]:
  """(train rows, eval rows) of metrics.jsonl by step; a resumed run's re-logged step keeps its last row."""
  train_rows, eval_rows = {}, {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path) as fh:
      for line in fh:
        if line.strip():
          r = json.loads(line)
          (eval_rows if "val_loss" in r else train_rows if "loss" in r else {})[r["step"]] = r
  return train_rows, eval_rows


def eval_settings(ev: Mapping[str, Any]) -> dict[str, Any]:
  tasks = [str(t) for t in (ev.get("tasks") or evaluate.DEFAULT_TASKS)]
  return {"tasks": tasks, "num_texts": ev["num_texts"], "max_length": ev["max_length"], "version": _EVAL_VERSION}


def evaluate_checkpoint(p: sweep.Point, step: int, ev: Mapping[str, Any]) -> dict[str, Any]:
  """train_ce, val_loss / val_ppl / val_dispersion, acc and acc_norm of every task, mean_acc, mean_acc_norm,
  spearman / kendall / mean_cos_by_layer of one checkpoint; cached per point + step + settings."""
  settings = eval_settings(ev)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(p.workdir, "results_eval", key, f"step_{step}.json")
  stamp = ct.checkpoint_stamp(p.workdir, step)
  if os.path.isfile(path):
    try:
      with open(path) as fh:
        cached = json.load(fh)
      if cached.get("stamp") == stamp:
        return cached["row"]
    except (OSError, json.JSONDecodeError, KeyError):
      pass
  train_rows, eval_rows = _metric_rows(p.workdir)
  model_cfg, params, tok_name = evaluate.load_model(p.workdir, step)
  # CE, not the total: the (negative) dispersion term would make totals incomparable across coefficients.
  tail = [train_rows[s]["ce"] for s in sorted(train_rows) if s <= step][-_TAIL:]
  row: dict[str, Any] = {"step": step, "train_ce": float(np.mean(tail)) if tail else None}
  if step in eval_rows:  # the run's own evaluation at this step
    r = eval_rows[step]
    row.update(val_loss=r["val_loss"], val_ppl=r["val_ppl"], val_dispersion=r.get("val_dispersion"))
  else:  # the same batches train.evaluate uses
    pp = evaluate.perplexity(
        model_cfg, params, p.cfg, num_batches=p.cfg.eval_batches, batch_size=p.cfg.batch_size // p.cfg.grad_accum
    )
    row.update(val_loss=pp["loss"], val_ppl=pp["ppl"], val_dispersion=None)
  tokenizer = get_tokenizer(tok_name)
  accs, norms = [], []
  for task in settings["tasks"]:
    res = evaluate.evaluate_task(model_cfg, params, tokenizer, evaluate.load_task(task))
    name = pathlib.Path(task).stem
    row[f"acc/{name}"], row[f"acc_norm/{name}"] = res["acc"], res["acc_norm"]
    accs.append(res["acc"])
    norms.append(res["acc_norm"])
  row["mean_acc"], row["mean_acc_norm"] = float(np.mean(accs)), float(np.mean(norms))
  tokens = [ids[: ev["max_length"]] for ids in tokenizer.encode_batch(corpus_texts(ev["num_texts"]))]
  summary = ct.checkpoint_statistics(
      p.workdir, step, tokens, max_length=ev["max_length"], source="corpus:default", model=(model_cfg, params, tok_name)
  )
  row.update(
      spearman=summary["spearman"], kendall=summary["kendall"], mean_cos_by_layer=summary["mean_cossim_by_layer"]
  )
  ct.write_json(path, {"stamp": stamp, "settings": settings, "row": row})
  return row


def expected_steps(cfg) -> list[int]:
  """The steps a run saves: every checkpoint_every and the final one."""
  return sorted(set(range(cfg.checkpoint_every, cfg.steps + 1, cfg.checkpoint_every)) | {cfg.steps})


def collect(
    config_paths: str | Sequence[str],
    sweep_dir: str,
    *,
    group_by: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    max_checkpoints: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[str], dict[str, str]]:
  """Evaluates every selected checkpoint of every finished point of one or several sweep configs run in the same
  sweep_dir (e.g. a dispersion.coeff sweep and a baseline.method sweep): (rows, group_by, notes by point). A
  point seen twice (the same workdir, or the same run config in another workdir) counts once."""
  paths = [config_paths] if isinstance(config_paths, str) else list(config_paths)
  if not os.path.isdir(sweep_dir):
    raise ConfigError(
        f"--sweep_dir {sweep_dir} is not a directory; run the sweep first: python -m "
        f"dispersion_jax.sweep --config {paths[0]} --workdir {sweep_dir}"
    )
  specs = [sweep.load_sweep(path) for path in paths]
  evs = []
  for spec in specs:
    ev = dict(spec["eval"])
    if tasks:
      ev["tasks"] = list(tasks)
    evs.append(ev)
  if any(eval_settings(e) != eval_settings(evs[0]) for e in evs):
    raise ConfigError(
        f"the sweep configs {', '.join(paths)} evaluate differently (eval: tasks, num_texts, "
        "max_length); give them the same eval settings (or the same --tasks)"
    )
  ev = evs[0]
  for t in ev["tasks"] or []:
    if not os.path.isfile(t):
      raise DataError(f"task file {t} not found")
  if not group_by:
    group_by = list(dict.fromkeys(k for spec in specs for k in spec["axes"] if k != "seed"))
  group_by = list(group_by)
  check_keys(group_by)
  rows, notes, seen = [], {}, {}
  for p in (p for spec in specs for p in sweep.expand(spec, sweep_dir)):
    if os.path.abspath(p.workdir) in seen:
      continue
    have = ct.checkpoint_steps(p.workdir)
    if not have or have[-1] < p.cfg.steps:
      notes[p.name] = "not finished (no final checkpoint): left out"
      continue
    ident = p.cfg.to_json(sort_keys=True)
    if ident in seen:
      notes[p.name] = f"the same run config as {seen[ident]}: counted once"
      continue
    seen[os.path.abspath(p.workdir)] = seen[ident] = p.name
    want = expected_steps(p.cfg)
    if len(set(want) & set(have)) < len(want):
      notes[p.name] = (
          f"{len(have)} of {len(want)} checkpoints kept (max_to_keep={p.cfg.max_to_keep}); set "
          '"max_to_keep": None in the sweep\'s overrides to keep them all'
      )
    chosen = ct.pick_steps(have, steps, max_checkpoints)
    if not chosen:
      notes[p.name] = f"none of the steps {sorted(steps or [])} saved (it has {have}): left out"
      continue
    values = {k: config_value(p, k) for k in group_by}
    for s in chosen:
      log(f"[results] {p.name}: step {s}")
      rows.append({"name": p.name, "seed": p.cfg.seed, **values, **evaluate_checkpoint(p, s, ev)})
  if not rows:
    raise DataError(
        f"no finished point with checkpoints in {sweep_dir}; train it first: python -m "
        f"dispersion_jax.sweep --config {paths[0]} --workdir {sweep_dir}"
    )
  return rows, group_by, notes


def _strict(x: Any) -> Any:
  """NaN -> None (strict JSON)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, Mapping):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  return x


def write_results(
    rows: Sequence[Mapping],
    group_by: Sequence[str],
    out_dir: str,
    *,
    rules: Sequence[str] = DEFAULT_RULES,
    reference: Mapping[str, Any] = DEFAULT_REFERENCE,
    metrics: Sequence[str] | None = None,
    select_metrics: Sequence[str] | None = None,
    notes: Mapping[str, str] | None = None,
    title: str = "Results",
) -> dict[str, list[dict]]:
  """OUT/results_table.md, results_table.tex, results_table.json (the groups per rule), results_checkpoints.csv
  (every evaluated checkpoint) and results_selected.csv (the chosen checkpoint of each point per rule)."""
  os.makedirs(out_dir, exist_ok=True)
  metrics = list(metrics) if metrics is not None else metric_columns(rows)
  unknown = [m for m in metrics if m not in metric_columns(rows)]
  if unknown:
    raise ConfigError(
        f"metric {unknown[0]!r} is not in the evaluation rows; use some of " f"{', '.join(metric_columns(rows))}"
    )
  tables = build_tables(
      rows, group_by, rules=rules, reference=reference, metrics=metrics, select_metrics=select_metrics
  )
  md = to_markdown(tables, group_by, metrics, title)
  ref_keys = [k for k in reference if k in group_by]
  md += (
      "\nReference: "
      + (
          ", ".join(f"{k} = {_key_text(reference[k])}" for k in ref_keys)
          if ref_keys
          else "none of the reference keys is a grouping key, so there are no differences"
      )
      + "\n"
  )
  if notes:
    md += "\nNotes:\n" + "".join(f"- {name}: {text}\n" for name, text in notes.items())
  with open(os.path.join(out_dir, "results_table.md"), "w") as fh:
    fh.write(md)
  with open(os.path.join(out_dir, "results_table.tex"), "w") as fh:
    fh.write(to_latex(tables, group_by, metrics))
  with open(os.path.join(out_dir, "results_table.json"), "w") as fh:
    json.dump(
        _strict(
            {
                "group_by": list(group_by),
                "reference": dict(reference),
                "rules": {r: RULES[r] for r in tables},
                "tables": tables,
            }
        ),
        fh,
        indent=1,
        default=str,
    )
  cols = ["name", "seed", *group_by, "step", *metric_columns(rows)]
  with open(os.path.join(out_dir, "results_checkpoints.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["name"], r["step"])))
  with open(os.path.join(out_dir, "results_selected.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=["selected_by", *cols], extrasaction="ignore")
    w.writeheader()
    for rule in tables:
      w.writerows(select(rows, rule, group_by=group_by, select_metrics=select_metrics))
  return tables


def run_results(
    config_path: str | Sequence[str],
    sweep_dir: str,
    out_dir: str | None = None,
    *,
    group_by=None,
    tasks=None,
    steps=None,
    max_checkpoints=None,
    rules: Sequence[str] = DEFAULT_RULES,
    reference: Mapping[str, Any] = DEFAULT_REFERENCE,
    metrics=None,
    select_metrics=None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
  """Evaluate (cached) and tabulate a finished sweep (or several sweep configs run in one sweep_dir); returns
  rule -> groups."""
  paths = [config_path] if isinstance(config_path, str) else list(config_path)
  for r in rules:
    if r not in RULES:
      raise ConfigError(f"unknown selection rule {r!r}; use some of {', '.join(RULES)}")
  rows, group_by, notes = collect(
      paths, sweep_dir, group_by=group_by, tasks=tasks, steps=steps, max_checkpoints=max_checkpoints, log=log
  )
  for name, text in notes.items():
    log(f"[results] {name}: {text}")
  return write_results(
      rows,
      group_by,
      out_dir or sweep_dir,
      rules=rules,
      reference=reference,
      metrics=metrics,
      select_metrics=select_metrics,
      notes=notes,
      title=f"Results of {', '.join(pathlib.Path(c).stem for c in paths)} ({sweep_dir})",
  )
