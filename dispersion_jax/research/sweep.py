"""Grid sweeps of training runs (command line: python -m dispersion_jax sweep, cli/sweep.py).

A sweep config defines `get_config()` returning a ConfigDict (or dict) with
  base       a training config file (e.g. configs/gpt2_tiny.py)
  overrides  {config key: value} applied to every point (dotted keys; nested dicts are flattened)
  axes       {config key: [values]}; the sweep is their cross product (e.g. dispersion.coeff, seed)
  eval       optional {num_texts, max_length, tasks, include_path, num_fewshot, limit}: the condensation texts and
             the lm-evaluation-harness tasks (names or suites; default the shipped examples, research/evaluate.py)
Use `ConfigDict({...}, allow_dotted_keys=True)` for dotted keys. Every point is an ordinary training run
(`train.run`) in WORKDIR/<name from its values>; re-running skips finished points (final step reached) and resumes
interrupted ones. --vmap trains points that differ only in seed / dispersion.coeff together in one compiled step
(vmap_train.py). Then each point is evaluated once (cached in its WORKDIR/sweep_eval.json) and WORKDIR gets
results.csv, results.md (per point, and mean ± std over seeds) and sweep_summary.png, condensation_by_layer.png.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from ml_collections import ConfigDict

from dispersion_jax import config as config_lib
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import CheckpointError, ConfigError, DataError, TrainingError
from dispersion_jax.evaluation import evaluate
from dispersion_jax.evaluation.condensation import model_statistics
from dispersion_jax.research import vmap_train
from dispersion_jax.research.condensation_report import corpus_texts
from dispersion_jax.research.condensation_training import checkpoint_steps as ct_steps
from dispersion_jax.storage import paths
from dispersion_jax.training import metrics, train

REPO = pathlib.Path(__file__).resolve().parent.parent
# tasks None = evaluate.DEFAULT_TASKS; include_path: a folder of task YAMLs; None shots / limit: the tasks' own
EVAL_DEFAULTS = {
    "num_texts": 32,
    "max_length": 128,
    "tasks": None,
    "include_path": None,
    "num_fewshot": None,
    "limit": None,
}
_EVAL_VERSION = 3  # bump when a point's evaluation row changes: cached rows are recomputed
_TAIL = 5  # train_ce = mean CE of the last 5 logged steps (one batch each is noisy)


@dataclasses.dataclass
class Point:
  values: dict[str, Any]  # axis key -> value
  name: str
  cfg: ConfigDict
  workdir: str


# ------------------------------------------------------------------------------------------------ the plan
def load_sweep(path: str) -> dict[str, Any]:
  """{base, overrides, axes (seed last), eval} from a sweep config file; ConfigError names what is wrong."""
  if not os.path.isfile(path):
    raise ConfigError(f"sweep config {path} not found; e.g. --config configs/sweeps/demo.py")
  raw = config_lib.load_module(path).get_config()
  raw = raw.to_dict() if isinstance(raw, ConfigDict) else dict(raw)
  unknown = set(raw) - {"base", "overrides", "axes", "eval"}
  if unknown or not isinstance(raw.get("base"), str) or not raw.get("axes"):
    raise ConfigError(
        f"{path}: get_config() needs base (a config file) and axes (key -> list), may have "
        f"overrides and eval; got {sorted(raw)}"
    )
  axes = traverse_util.flatten_dict(raw["axes"], sep=".")
  for k, v in axes.items():
    if not isinstance(v, (list, tuple)) or not v:
      raise ConfigError(f"{path}: axes[{k!r}] must be a non-empty list of values")
  order = [k for k in axes if k != "seed"] + (["seed"] if "seed" in axes else [])
  ev = {**EVAL_DEFAULTS, **dict(raw.get("eval") or {})}
  return {
      "base": raw["base"],
      "overrides": traverse_util.flatten_dict(raw.get("overrides") or {}, sep="."),
      "axes": {k: list(axes[k]) for k in order},
      "eval": ev,
  }


def _text(v: Any) -> str:
  return v if isinstance(v, str) else repr(v)  # apply_override parses it back, typed by the schema


def _base_path(base: str) -> str:
  return base if os.path.isfile(base) or os.path.isabs(base) else str(REPO / base)


def point_config(sweep: dict, values: Mapping[str, Any]) -> ConfigDict:
  cfg = config_lib.load_config(_base_path(sweep["base"]))
  for key, v in {**sweep["overrides"], **values}.items():
    config_lib.apply_override(cfg, key, _text(v))
  config_lib.validate(cfg)
  return cfg


def point_name(values: Mapping[str, Any]) -> str:
  """`coeff-0.1_seed-0`: leaf names, or the full key where two axes share a leaf name."""
  leaves = [k.rsplit(".", 1)[-1] for k in values]
  parts = []
  for key, leaf in zip(values, leaves):
    label = leaf if leaves.count(leaf) == 1 else key
    parts.append(f"{label}-{values[key]}".replace("/", "_").replace(" ", ""))
  return "_".join(parts)


def expand(sweep: dict, root: str) -> list[Point]:
  keys = list(sweep["axes"])
  points = []
  for combo in itertools.product(*sweep["axes"].values()):
    values = dict(zip(keys, combo))
    name = point_name(values)
    points.append(Point(values, name, point_config(sweep, values), paths.join(root, name)))
  return points


def latest_step(workdir: str) -> int | None:
  """Newest finished checkpoint step (condensation_training.checkpoint_steps: local or in a bucket)."""
  return max(ct_steps(workdir), default=None)


# ------------------------------------------------------------------------------------------------ training
def train_points(
    points: list[Point],
    *,
    vmap: bool = False,
    max_members: int | None = None,
    stop_at: int | None = None,
    devices: list | None = None,
) -> dict[str, str]:
  """Trains what is not finished; returns name -> status (finished, stopped at N, failed: ...)."""
  status = {}
  todo = []
  for p in points:
    step = latest_step(p.workdir) or 0
    if step >= p.cfg.steps:
      print(f"[sweep] {p.name}: finished (step {step}), skipped")
      status[p.name] = "finished"
    else:
      todo.append(p)
  groups: dict[Any, list[Point]] = {}
  for i, p in enumerate(todo):  # points sharing shapes and static settings AND their resume step train together
    key = (vmap_train.group_key(p.cfg), latest_step(p.workdir)) if vmap else i
    groups.setdefault(key, []).append(p)
  chunks = [
      g[i : i + (max_members or len(g))] for g in groups.values() for i in range(0, len(g), max_members or len(g))
  ]
  for chunk in chunks:
    names = ", ".join(p.name for p in chunk)
    print(f"[sweep] training {names}" + (f" ({len(chunk)} members in one vmapped step)" if len(chunk) > 1 else ""))
    try:
      if len(chunk) == 1:
        last = train.run(chunk[0].cfg, chunk[0].workdir, devices=devices, stop_at=stop_at)
      else:
        last = vmap_train.run_group([p.cfg for p in chunk], [p.workdir for p in chunk], stop_at=stop_at)
      for p in chunk:
        status[p.name] = "finished" if last >= p.cfg.steps else f"stopped at {last}"
    except (TrainingError, CheckpointError, DataError) as e:
      print(f"[sweep] {names}: failed: {e}")
      for p in chunk:
        status[p.name] = f"failed: {e}"
      continue
    if stop_at is None and last < chunk[0].cfg.steps:  # SIGTERM: the group saved; stop the sweep too
      print("[sweep] preempted: checkpoints saved; re-run the same command to resume")
      break
  return {p.name: status.get(p.name, "not started") for p in points}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_point(p: Point, ev: Mapping[str, Any]) -> dict[str, Any]:
  """Final train/val loss, task accuracy and condensation of a finished point (cached per step and settings)."""
  cache_path = paths.join(p.workdir, "sweep_eval.json")
  step = latest_step(p.workdir)
  settings = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in ev.items()}
  settings["version"] = _EVAL_VERSION
  cached = paths.read_text(cache_path)
  if cached is not None:
    cached = json.loads(cached)
    if cached.get("step") == step and cached.get("settings") == settings:
      return cached["row"]
  history = metrics.read_history(p.workdir)  # the run's one history: every (step, kind) once
  train_rows = [history["train"][s] for s in sorted(history["train"]) if s <= step]
  val = [history["eval"][step]] if step in history["eval"] else []
  model_cfg, params, tok_name = evaluate.load_model(p.workdir)
  # CE, not the total: a dispersion term (negative) would make totals incomparable across coefficients.
  tail = [r["ce"] for r in train_rows[-_TAIL:]]
  row: dict[str, Any] = {"step": step, "train_ce": float(np.mean(tail)) if tail else None}
  if val:  # the run's own final evaluation
    row.update(val_loss=val[-1]["val_loss"], val_ppl=val[-1]["val_ppl"], val_dispersion=val[-1]["val_dispersion"])
  else:  # same batches as training's evaluations (training/validation.py) would use
    pp = evaluate.perplexity(
        model_cfg, params, p.cfg, num_batches=p.cfg.eval_batches, batch_size=p.cfg.batch_size // p.cfg.grad_accum
    )
    row.update(val_loss=pp["loss"], val_ppl=pp["ppl"], val_dispersion=None)
  tokenizer = get_tokenizer(tok_name)
  logged = next((r for r in val if any(k.startswith("lm_eval/") for k in r)), {})  # harness rows of that eval
  cols = evaluate.checkpoint_task_columns(model_cfg, params, tok_name, ev, logged)
  row.update({k: v for k, v in cols.items() if k != "mean_acc_norm"})
  tokens = [ids[: ev["max_length"]] for ids in tokenizer.encode_batch(corpus_texts(ev["num_texts"]))]
  summary = model_statistics(model_cfg, params, tokens, max_length=ev["max_length"])
  summary["settings"].update(model=p.workdir, source="corpus:default", tokenizer=tok_name)
  paths.write_text(paths.join(p.workdir, "condensation.json"), json.dumps(summary, indent=1))
  row.update(
      spearman=summary["spearman"], kendall=summary["kendall"], mean_cos_by_layer=summary["mean_cossim_by_layer"]
  )
  paths.write_text(cache_path, json.dumps({"step": step, "settings": settings, "row": row}, indent=1))
  return row


# ------------------------------------------------------------------------------------------------ reporting
METRICS = ("train_ce", "val_loss", "val_ppl", "val_dispersion", "spearman", "kendall", "mean_acc")


def _num(x: Any) -> float:
  return float("nan") if x is None else float(x)


def group_rows(rows: list[dict], axes: list[str]) -> list[dict]:
  """Mean ± std (sample std, ddof 1) over seeds of every metric, per combination of the other axes."""
  others = [a for a in axes if a != "seed"]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get("status") == "finished":
      groups.setdefault(tuple(r[a] for a in others), []).append(r)
  out = []
  for key, members in groups.items():
    g: dict[str, Any] = {**dict(zip(others, key)), "n": len(members)}
    for m in [k for k in members[0] if k in METRICS or k.startswith("acc")]:
      v = np.asarray([_num(r.get(m)) for r in members])
      g[m] = float(np.mean(v))
      g[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    layers = [r["mean_cos_by_layer"] for r in members if r.get("mean_cos_by_layer")]
    g["mean_cos_by_layer"] = np.mean(layers, axis=0).tolist() if layers else None
    out.append(g)
  return out


def _fmt(x: Any, std: Any = None) -> str:
  if isinstance(x, float):
    s = "n/a" if math.isnan(x) else f"{x:.4g}"
    return s if std is None or math.isnan(std) else f"{s} ± {std:.2g}"
  return "n/a" if x is None else str(x)


def write_results(rows: list[dict], axes: list[str], out_dir: str) -> list[dict]:
  """results.csv (one row per point), results.md (per point + grouped over seeds), the plots; returns the groups."""
  cols = ["name", *axes, "status", "step", *[m for m in METRICS]]
  cols += sorted({k for r in rows for k in r if k.startswith("acc")})
  with paths.writing(paths.join(out_dir, "results.csv")) as fh:
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  groups = group_rows(rows, axes)
  others = [a for a in axes if a != "seed"]
  gcols = [m for m in (*METRICS, *[c for c in cols if c.startswith("acc")]) if any(m in g for g in groups)]
  lines = [
      "# Sweep results",
      "",
      "## Mean ± std over seeds",
      "",
      "| " + " | ".join([*others, "n", *gcols]) + " |",
      "|" + "---|" * (len(others) + 1 + len(gcols)),
  ]
  for g in groups:
    lines.append(
        "| "
        + " | ".join([*(str(g[a]) for a in others), str(g["n"]), *(_fmt(g.get(m), g.get(f"{m}_std")) for m in gcols)])
        + " |"
    )
  lines += ["", "## Every point", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:  # metrics as 4 significant digits; names, axis values and steps verbatim
    lines.append("| " + " | ".join(_fmt(_num(r.get(c))) if c in gcols else str(r.get(c)) for c in cols) + " |")
  paths.write_text(paths.join(out_dir, "results.md"), "\n".join(lines) + "\n")
  if groups:
    write_plots(groups, others, out_dir)
  return groups


def write_plots(groups: list[dict], others: list[str], out_dir: str) -> None:
  """sweep_summary.png: val loss, spearman, mean acc vs the x axis (coeff if swept), one line per other combination;
  condensation_by_layer.png: mean cosine vs depth per group (mean over seeds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_key = "dispersion.coeff" if "dispersion.coeff" in others else (others[0] if others else None)
  line_keys = [a for a in others if a != x_key]
  lines: dict[tuple, list[dict]] = {}
  for g in groups:
    lines.setdefault(tuple(g[a] for a in line_keys), []).append(g)
  fig, axs = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
  for ax, (m, label) in zip(
      axs, (("val_loss", "validation loss"), ("spearman", "condensation spearman"), ("mean_acc", "mean task accuracy"))
  ):
    for key, gs in lines.items():
      xs = [g[x_key] if x_key else 0 for g in gs]
      numeric = all(isinstance(x, (int, float)) for x in xs)
      pos = xs if numeric else list(range(len(xs)))
      ax.errorbar(
          pos,
          [g.get(m, np.nan) for g in gs],
          yerr=[np.nan_to_num(g.get(f"{m}_std", 0.0)) for g in gs],
          marker="o",
          capsize=3,
          label=", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(line_keys, key)) or None,
      )
      if not numeric:
        ax.set_xticks(pos, [str(x) for x in xs])
    ax.set(xlabel=x_key or "", ylabel=label, title=f"{label} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if line_keys:
      ax.legend(fontsize=7)
  with paths.writing(paths.join(out_dir, "sweep_summary.png"), binary=True) as fh:
    fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  for g in groups:
    if g.get("mean_cos_by_layer"):
      label = ", ".join(f"{a.rsplit('.', 1)[-1]}={g[a]}" for a in others) + f" (spearman {g.get('spearman', 0):+.2f})"
      ax.plot(range(len(g["mean_cos_by_layer"])), g["mean_cos_by_layer"], "o-", label=label)
  ax.set(xlabel="layer (0 = embeddings)", ylabel="mean token-token cosine", title="condensation (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  with paths.writing(paths.join(out_dir, "condensation_by_layer.png"), binary=True) as fh:
    fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ driver
def run_sweep(
    config_path: str,
    workdir: str | None = None,
    *,
    vmap: bool = False,
    max_members: int | None = None,
    evaluate: bool = True,
    stop_at: int | None = None,
    devices: list | None = None,
) -> list[dict]:
  """Train (skip / resume), evaluate the finished points, write the reports; returns one row per point."""
  sweep = load_sweep(config_path)
  workdir = workdir or os.path.join("runs", "sweeps", pathlib.Path(config_path).stem)
  paths.path(workdir, what="--workdir").mkdir(parents=True, exist_ok=True)  # a bucket has no folders to create
  points = expand(sweep, workdir)
  status = train_points(points, vmap=vmap, max_members=max_members, stop_at=stop_at, devices=devices)
  rows = []
  for p in points:
    row = {"name": p.name, **p.values, "status": status[p.name]}
    if evaluate and status[p.name] == "finished":
      print(f"[sweep] evaluating {p.name}")
      row.update(evaluate_point(p, sweep["eval"]))
    rows.append(row)
  if evaluate:
    write_results(rows, list(sweep["axes"]), workdir)
    print(f"[sweep] wrote {workdir}/results.csv, results.md, sweep_summary.png, condensation_by_layer.png")
  return rows
