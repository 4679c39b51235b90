"""The results table of a finished sweep (command line: python -m dispersion_jax results): collecting and
evaluating a sweep directory's checkpoints and writing the table files.

Per group of points (default: the sweep's axes except seed, e.g. baseline.method and dispersion.coeff; any run
config keys with group_by), mean ± sample std over seeds of every evaluation metric and each group's difference to
its CE-only reference group, as Markdown and LaTeX (booktabs), with one checkpoint per point chosen by each rule of
results_select.RULES (last, val, test, test_group); the text of the tables: results_render.

This needs every checkpoint evaluated: `evaluate_checkpoint` (validation loss, the multiple-choice tasks, the
condensation statistics of sweep.evaluate_point) caches each point + step + settings in
POINT/results_eval/<key>/step_<N>.json; `max_checkpoints` / `steps` limit the cost. The table logic (results_select:
select, aggregate, with_deltas; results_render: to_markdown, to_latex) takes plain rows {"name", "step", <group
keys>, <metrics>}, so it runs without training. A sweep keeps every checkpoint with "max_to_keep": None in its
overrides (the default keeps 3; a pruned point is reported). Several sweep configs run in one sweep_dir (e.g. a
dispersion.coeff sweep and a baseline.method sweep, since baselines are CE only) are tabulated together; a run
seen twice counts once.
"""

import csv
import hashlib
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from dispersion_jax import config as config_lib
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import ConfigError, DataError
from dispersion_jax.evaluation import evaluate
from dispersion_jax.research import condensation_training as ct
from dispersion_jax.research import sweep
from dispersion_jax.research.condensation_report import corpus_texts
from dispersion_jax.research.results_render import build_tables, key_text, to_latex, to_markdown
from dispersion_jax.research.results_select import DEFAULT_REFERENCE, DEFAULT_RULES, RULES, metric_columns, select
from dispersion_jax.storage import paths
from dispersion_jax.training import metrics

_EVAL_VERSION = 2  # bump when a checkpoint's evaluation row changes meaning
_TAIL = 5  # train_ce: mean CE of the last 5 logged steps up to the checkpoint


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
  """(train rows, eval rows) of metrics.jsonl by step: the run's one history (metrics.read_history)."""
  history = metrics.read_history(workdir)
  return history["train"], history["eval"]


def eval_settings(ev: Mapping[str, Any]) -> dict[str, Any]:
  tasks = [str(t) for t in (ev.get("tasks") or evaluate.DEFAULT_TASKS)]
  harness = {k: ev.get(k) for k in ("include_path", "num_fewshot", "limit")}
  return {
      "tasks": tasks,
      "num_texts": ev["num_texts"],
      "max_length": ev["max_length"],
      **harness,
      "version": _EVAL_VERSION,
  }


def evaluate_checkpoint(p: sweep.Point, step: int, ev: Mapping[str, Any]) -> dict[str, Any]:
  """train_ce, val_loss / val_ppl / val_dispersion, acc and acc_norm of every task, mean_acc, mean_acc_norm,
  spearman / kendall / mean_cos_by_layer of one checkpoint; cached per point + step + settings."""
  settings = eval_settings(ev)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  path = paths.join(p.workdir, "results_eval", key, f"step_{step}.json")
  stamp = ct.checkpoint_stamp(p.workdir, step)
  cached = ct.read_json(path)
  if isinstance(cached, dict) and cached.get("stamp") == stamp and "row" in cached:
    return cached["row"]
  train_rows, eval_rows = _metric_rows(p.workdir)
  model_cfg, params, tok_name = evaluate.load_model(p.workdir, step)
  # CE, not the total: the (negative) dispersion term would make totals incomparable across coefficients.
  tail = [train_rows[s]["ce"] for s in sorted(train_rows) if s <= step][-_TAIL:]
  row: dict[str, Any] = {"step": step, "train_ce": float(np.mean(tail)) if tail else None}
  if step in eval_rows:  # the run's own evaluation at this step
    r = eval_rows[step]
    row.update(val_loss=r["val_loss"], val_ppl=r["val_ppl"], val_dispersion=r.get("val_dispersion"))
  else:  # the same batches training's evaluations (training/validation.py) uses
    pp = evaluate.perplexity(
        model_cfg, params, p.cfg, num_batches=p.cfg.eval_batches, batch_size=p.cfg.batch_size // p.cfg.grad_accum
    )
    row.update(val_loss=pp["loss"], val_ppl=pp["ppl"], val_dispersion=None)
  tokenizer = get_tokenizer(tok_name)
  # The run's own harness metrics at this step (eval.tasks during training) when they cover the tasks.
  row.update(evaluate.checkpoint_task_columns(model_cfg, params, tok_name, settings, eval_rows.get(step)))
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
  configs = [config_paths] if isinstance(config_paths, str) else list(config_paths)
  if not paths.is_dir(sweep_dir, what="--sweep_dir"):
    raise ConfigError(
        f"--sweep_dir {sweep_dir} is not a directory; run the sweep first: python -m "
        f"dispersion_jax sweep --config {configs[0]} --workdir {sweep_dir}"
    )
  specs = [sweep.load_sweep(path) for path in configs]
  evs = []
  for spec in specs:
    ev = dict(spec["eval"])
    if tasks:
      ev["tasks"] = list(tasks)
    evs.append(ev)
  if any(eval_settings(e) != eval_settings(evs[0]) for e in evs):
    raise ConfigError(
        f"the sweep configs {', '.join(configs)} evaluate differently (eval: tasks, num_texts, "
        "max_length); give them the same eval settings (or the same --tasks)"
    )
  ev = evs[0]
  if not group_by:
    group_by = list(dict.fromkeys(k for spec in specs for k in spec["axes"] if k != "seed"))
  group_by = list(group_by)
  check_keys(group_by)
  rows, notes, seen = [], {}, {}
  for p in (p for spec in specs for p in sweep.expand(spec, sweep_dir)):
    if paths.absolute(p.workdir) in seen:
      continue
    have = ct.checkpoint_steps(p.workdir)
    if not have or have[-1] < p.cfg.steps:
      notes[p.name] = "not finished (no final checkpoint): left out"
      continue
    ident = p.cfg.to_json(sort_keys=True)
    if ident in seen:
      notes[p.name] = f"the same run config as {seen[ident]}: counted once"
      continue
    seen[paths.absolute(p.workdir)] = seen[ident] = p.name
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
        f"dispersion_jax sweep --config {configs[0]} --workdir {sweep_dir}"
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
          ", ".join(f"{k} = {key_text(reference[k])}" for k in ref_keys)
          if ref_keys
          else "none of the reference keys is a grouping key, so there are no differences"
      )
      + "\n"
  )
  if notes:
    md += "\nNotes:\n" + "".join(f"- {name}: {text}\n" for name, text in notes.items())
  paths.write_text(paths.join(out_dir, "results_table.md"), md)
  paths.write_text(paths.join(out_dir, "results_table.tex"), to_latex(tables, group_by, metrics))
  with paths.writing(paths.join(out_dir, "results_table.json")) as fh:
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
  with paths.writing(paths.join(out_dir, "results_checkpoints.csv")) as fh:
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["name"], r["step"])))
  with paths.writing(paths.join(out_dir, "results_selected.csv")) as fh:
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
  configs = [config_path] if isinstance(config_path, str) else list(config_path)
  for r in rules:
    if r not in RULES:
      raise ConfigError(f"unknown selection rule {r!r}; use some of {', '.join(RULES)}")
  rows, group_by, notes = collect(
      configs, sweep_dir, group_by=group_by, tasks=tasks, steps=steps, max_checkpoints=max_checkpoints, log=log
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
      title=f"Results of {', '.join(pathlib.Path(c).stem for c in configs)} ({sweep_dir})",
  )
