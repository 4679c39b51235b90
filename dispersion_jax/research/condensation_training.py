"""Condensation over training: the per-layer cosine statistics (condensation.model_statistics) of every checkpoint
of one or several runs, on one fixed set of texts (command line: python -m dispersion_jax condensation-training).

Each (run, checkpoint step, settings) is computed once and cached in RUN/condensation_cache/<key>/step_<N>.json;
the key is a hash of the token ids, max_length, batch_size and num_bins, and an entry is reused only while the
checkpoint directory is unchanged (its modification time), so a re-trained run is measured again. Writes to OUT:
  condensation_training.json           every summary (runs -> steps -> model_statistics output)
  condensation_training_heatmaps.png   the paper's figure: one row of panels per run, one column per checkpoint
                                       step; layers x cosine similarity, density as colour (one log scale for
                                       all panels), the per-layer mean in red
  condensation_training_mean.png       mean cosine of each layer vs step (one panel per run) and Spearman vs step
  condensation_training.md / .csv      mean cosine per layer, Spearman and Kendall per step per run
"""

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dispersion_jax.errors import CheckpointError, ConfigError
from dispersion_jax.evaluation.condensation import NUM_BINS, model_statistics
from dispersion_jax.evaluation.evaluate import load_model
from dispersion_jax.research import condensation_report as rep
from dispersion_jax.storage import paths
from dispersion_jax.training import saved_run

CACHE_DIR = "condensation_cache"
COMMIT_MARKER = "commit_success.txt"  # Orbax's: a step in a bucket is complete once this object is in it
_VERSION = 1  # bump when a cached summary changes meaning
FILES = {
    "json": "condensation_training.json",
    "heatmaps": "condensation_training_heatmaps.png",
    "mean": "condensation_training_mean.png",
    "md": "condensation_training.md",
    "csv": "condensation_training.csv",
}


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_steps(workdir: str) -> list[int]:
  """Every finished checkpoint step of a run, ascending (on a disk Orbax renames a step directory to its number
  only once it is complete; in a bucket, which has no rename, a step is complete once its commit marker is in)."""
  d = paths.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in paths.names(d) if n.isdigit())
  if paths.is_remote(workdir):
    steps = [s for s in steps if paths.exists(paths.join(d, str(s), COMMIT_MARKER))]
  return steps


def pick_steps(
    steps: Sequence[int], only: Sequence[int] | None = None, max_checkpoints: int | None = None
) -> list[int]:
  """`steps` restricted to `only` (if given), then thinned to at most `max_checkpoints` evenly spaced ones that
  keep the first and the last."""
  out = sorted(set(steps) & set(only)) if only is not None else sorted(steps)
  if max_checkpoints is not None and len(out) > max_checkpoints:
    if max_checkpoints < 1:
      raise ConfigError(f"max_checkpoints={max_checkpoints} must be >= 1")
    idx = np.unique(np.linspace(0, len(out) - 1, max_checkpoints).round().astype(int))
    out = [out[i] for i in idx]
  return out


def checkpoint_stamp(workdir: str, step: int) -> int:
  """Identifies one written checkpoint: its step directory's modification time (a new save gets a new one); in a
  bucket, which has no directories, its commit marker's."""
  d = paths.join(workdir, "checkpoints", str(step))
  return paths.mtime_ns(paths.join(d, COMMIT_MARKER) if paths.is_remote(workdir) else d)


def run_steps(workdir: str, only: Sequence[int] | None = None, max_checkpoints: int | None = None) -> list[int]:
  """The checkpoint steps of `workdir` to measure; a one-line error for a missing run or one without them."""
  if not paths.is_dir(workdir, what="workdir"):
    raise ConfigError(f"workdir {workdir} is not a directory")
  have = checkpoint_steps(workdir)
  if not have:
    raise CheckpointError(f"no checkpoint in {paths.join(workdir, 'checkpoints')}; train first")
  steps = pick_steps(have, only, max_checkpoints)
  if not steps:
    raise CheckpointError(f"{workdir} has none of the steps {sorted(only or [])} (it has {have})")
  return steps


# ------------------------------------------------------------------------------------------------ statistics
def settings_key(token_lists: Sequence[Sequence[int]], *, max_length: int, batch_size: int, num_bins: int) -> str:
  h = hashlib.sha256(
      json.dumps(
          {"version": _VERSION, "max_length": max_length, "batch_size": batch_size, "num_bins": num_bins},
          sort_keys=True,
      ).encode()
  )
  for ids in token_lists:
    h.update(np.asarray(list(ids), np.int64).tobytes())
    h.update(b"|")
  return h.hexdigest()[:16]


def write_json(path: str, obj: Any) -> None:
  paths.write_text(path, json.dumps(obj))  # whole: a killed run never leaves half a cache entry


def read_json(path: str) -> Any:
  """A cache entry, or None if it is missing or unreadable."""
  try:
    text = paths.read_text(path)
    return None if text is None else json.loads(text)
  except (OSError, json.JSONDecodeError):
    return None


def checkpoint_statistics(
    workdir: str,
    step: int,
    token_lists: Sequence[Sequence[int]],
    *,
    max_length: int,
    batch_size: int = 8,
    num_bins: int = NUM_BINS,
    source: str | None = None,
    model: tuple | None = None,
) -> dict[str, Any]:
  """`model_statistics` of one checkpoint (float32, XLA attention: evaluate.load_model), cached in the run.
  `model`: that checkpoint's (config, params, tokenizer name) when the caller has loaded it already."""
  key = settings_key(token_lists, max_length=max_length, batch_size=batch_size, num_bins=num_bins)
  path = paths.join(workdir, CACHE_DIR, key, f"step_{step}.json")
  stamp = checkpoint_stamp(workdir, step)
  cached = read_json(path)  # unreadable: measure again
  if isinstance(cached, dict) and cached.get("stamp") == stamp and "summary" in cached:
    return cached["summary"]
  cfg, params, tok_name = model if model is not None else load_model(workdir, step)
  summary = model_statistics(cfg, params, token_lists, max_length=max_length, batch_size=batch_size, num_bins=num_bins)
  summary["settings"].update(model=f"{workdir}@{step}", step=step, source=source, tokenizer=tok_name)
  write_json(path, {"stamp": stamp, "summary": summary})
  return summary


def run_tokenizer(workdir: str) -> str:
  return saved_run.load_run_config(workdir).tokenizer or "gpt2"


def over_training(
    workdirs: Sequence[str],
    token_lists_for: Callable[[str], list[list[int]]],
    *,
    max_length: int,
    labels: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    max_checkpoints: int | None = None,
    batch_size: int = 8,
    num_bins: int = NUM_BINS,
    source: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """The condensation summary of every (selected) checkpoint of every run.

  token_lists_for(tokenizer name) gives the texts as token ids for a run's tokenizer (called once per tokenizer).
  Returns {"settings", "runs": [{"label", "workdir", "tokenizer", "steps": [...], "summaries": {step: summary}}]}.
  """
  labels = list(labels) if labels is not None else [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ConfigError(f"{len(labels)} labels for {len(workdirs)} runs: give one label per run")
  plan = [(w, run_steps(w, steps, max_checkpoints)) for w in workdirs]  # every run checked before any work
  tokens: dict[str, list[list[int]]] = {}
  runs = []
  for label, (workdir, run_steps_) in zip(labels, plan):
    tok = run_tokenizer(workdir)
    if tok not in tokens:
      tokens[tok] = token_lists_for(tok)
    summaries = {}
    for step in run_steps_:
      log(f"[condensation] {label}: step {step}")
      summaries[step] = checkpoint_statistics(
          workdir, step, tokens[tok], max_length=max_length, batch_size=batch_size, num_bins=num_bins, source=source
      )
    runs.append({"label": label, "workdir": workdir, "tokenizer": tok, "steps": run_steps_, "summaries": summaries})
  return {
      "settings": {"max_length": max_length, "batch_size": batch_size, "num_bins": num_bins, "source": source},
      "runs": runs,
  }


# ------------------------------------------------------------------------------------------------ reports
def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per run and step: mean cosine per layer (layer_0 = embeddings), off-diagonal means, rank correlations."""
  rows = []
  for run in result["runs"]:
    for step in run["steps"]:
      s = run["summaries"][step]
      row = {
          "run": run["label"],
          "step": step,
          "num_texts": s["num_texts"],
          "num_tokens": s["num_tokens"],
          "spearman": s["spearman"],
          "kendall": s["kendall"],
          "spearman_offdiag": s["spearman_offdiag"],
      }
      row.update({f"layer_{i}": m for i, m in enumerate(s["mean_cossim_by_layer"])})
      rows.append(row)
  return rows


def _layer_cols(rows: Sequence[dict]) -> list[str]:
  n = max((int(k[6:]) + 1 for r in rows for k in r if k.startswith("layer_")), default=0)
  return [f"layer_{i}" for i in range(n)]


def _cell(x: Any) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  return f"{x:+.3f}" if isinstance(x, float) else str(x)


def write_tables(result: dict[str, Any], out_dir: str) -> list[dict[str, Any]]:
  rows = table_rows(result)
  layers = _layer_cols(rows)
  cols = ["run", "step", *layers, "spearman", "kendall", "spearman_offdiag", "num_texts", "num_tokens"]
  with paths.writing(paths.join(out_dir, FILES["csv"])) as fh:
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  st = result["settings"]
  lines = [
      "# Condensation over training",
      "",
      f"Mean token-token cosine similarity per layer (layer_0 = embeddings, the last = after the final norm; "
      f"diagonal included) and its rank correlation with depth, on {rows[0]['num_texts'] if rows else 0} texts "
      f"({st.get('source')}, max_length {st['max_length']}).",
      "",
      "| " + " | ".join(cols[:-2]) + " |",
      "|" + "---|" * (len(cols) - 2),
  ]
  for r in rows:
    lines.append(
        "| " + " | ".join(_cell(r.get(c, None)) if c not in ("run", "step") else str(r[c]) for c in cols[:-2]) + " |"
    )
  with paths.writing(paths.join(out_dir, FILES["md"])) as fh:
    fh.write("\n".join(lines) + "\n")
  return rows


def write_heatmaps(result: dict[str, Any], out_dir: str) -> str:
  """One row per run, one column per checkpoint step (the union over runs; a run without that step: empty)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = result["runs"]
  steps = sorted({s for r in runs for s in r["steps"]})
  norm = rep.density_norm([s for r in runs for s in r["summaries"].values()])
  fig, axes = plt.subplots(
      len(runs),
      len(steps),
      figsize=(3.3 * len(steps) + 1.2, 3.1 * len(runs)),
      squeeze=False,
      sharey=True,
      layout="constrained",
  )
  im = None
  for i, run in enumerate(runs):
    for j, step in enumerate(steps):
      ax = axes[i][j]
      s = run["summaries"].get(step)
      if s is None:
        ax.set_axis_off()
        ax.set_title(f"{run['label']}: no step {step}", fontsize=8)
        continue
      im = rep._heatmap(
          ax,
          s,
          f"{run['label']}\nstep {step}, spearman {rep.fmt(s['spearman'])}",
          norm=norm,
          legend=(i == 0 and j == 0),
      )
      ax.title.set_fontsize(8)
      if i < len(runs) - 1:
        ax.set_xlabel("")
      if j > 0:
        ax.set_ylabel("")
  if im is not None:
    fig.colorbar(im, ax=axes, label="density", shrink=0.8)
  path = paths.join(out_dir, FILES["heatmaps"])
  with paths.writing(path, binary=True) as fh:
    fig.savefig(fh, format="png", dpi=100)
  plt.close(fig)
  return path


def write_mean_plot(result: dict[str, Any], out_dir: str) -> str:
  """Per run: the mean cosine of each layer vs step (colour = depth); last panel: Spearman vs step per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = result["runs"]
  ncols = min(5, len(runs) + 1)
  nrows = math.ceil((len(runs) + 1) / ncols)
  fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False, layout="constrained")
  axes = [ax for row in grid for ax in row]
  for ax in axes[len(runs) + 1 :]:
    ax.set_axis_off()
  means = [m for r in runs for s in r["steps"] for m in r["summaries"][s]["mean_cossim_by_layer"]]
  lo, hi = min(means), max(means)
  for ax, run in zip(axes, runs):
    steps = run["steps"]
    by_layer = np.asarray([run["summaries"][s]["mean_cossim_by_layer"] for s in steps])  # [steps, layers]
    n = by_layer.shape[1]
    colors = plt.cm.viridis(np.linspace(0, 0.9, n))
    for layer in range(n):
      name = "embeddings" if layer == 0 else f"layer {layer}" + (" (final norm)" if layer == n - 1 else "")
      ax.plot(steps, by_layer[:, layer], "o-", ms=3, color=colors[layer], label=name)
    ax.set(
        xlabel="step",
        ylabel="mean token-token cosine",
        title=run["label"],
        ylim=(lo - 0.05 * (hi - lo) - 1e-3, hi + 0.05 * (hi - lo) + 1e-3),
    )  # one scale for every run
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  ax = axes[len(runs)]
  for run in runs:
    sp = [run["summaries"][s]["spearman"] for s in run["steps"]]
    ax.plot(run["steps"], [np.nan if v is None else v for v in sp], "o-", label=run["label"])
  ax.axhline(0, color="grey", lw=0.8)
  ax.set(xlabel="step", ylabel="Spearman (mean cosine vs depth)", title="condensation vs step", ylim=(-1.05, 1.05))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path = paths.join(out_dir, FILES["mean"])
  with paths.writing(path, binary=True) as fh:
    fig.savefig(fh, format="png", dpi=100)
  plt.close(fig)
  return path


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
  return {
      "settings": result["settings"],
      "runs": [
          {
              **{k: v for k, v in r.items() if k != "summaries"},
              "summaries": {str(s): v for s, v in r["summaries"].items()},
          }
          for r in result["runs"]
      ],
  }


def write_report(result: dict[str, Any], out_dir: str) -> dict[str, str]:
  """Every output file; returns name -> path."""
  with paths.writing(paths.join(out_dir, FILES["json"])) as fh:
    json.dump(_json_ready(result), fh, indent=1)
  write_tables(result, out_dir)
  write_heatmaps(result, out_dir)
  write_mean_plot(result, out_dir)
  return {k: paths.join(out_dir, f) for k, f in FILES.items()}
