"""The condensation report (statistics in condensation.py; command line: python -m dispersion_jax condensation).

Writes OUT/condensation.json, OUT/condensation_heatmap.png (layers x cosine, density as colour),
OUT/condensation_mean.png (m_l vs depth) and, with --compare, OUT/condensation_compare.png.
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dispersion_jax.data.corpus import default_docs
from dispersion_jax.data.tokenizer import get_tokenizer

FILES = {
    "json": "condensation.json",
    "heatmap": "condensation_heatmap.png",
    "mean": "condensation_mean.png",
    "compare": "condensation_compare.png",
}


def token_ids_from_npy(path: str) -> list[list[int]]:
  """Rows of an int array; negative entries are padding and must trail the real tokens."""
  try:
    arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read --token-ids {path}: {e}") from None
  arr = arr[None] if arr.ndim == 1 else arr
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"--token-ids {path} must be an integer array [num_texts, length], got {arr.dtype} {arr.shape}")
  out = []
  for i, row in enumerate(arr.tolist()):
    n = next((j for j, t in enumerate(row) if t < 0), len(row))
    if any(t >= 0 for t in row[n:]):
      raise ValueError(f"--token-ids row {i}: negative (padding) ids must come after all real tokens")
    out.append(row[:n])
  return out


def corpus_texts(num_texts: int) -> list[str]:
  """num_texts documents spread evenly over the default corpus (both of its sources), deterministic."""
  docs = [text for _, text in default_docs() if text.strip()]
  idx = np.unique(np.linspace(0, len(docs) - 1, min(num_texts, len(docs))).round().astype(int))
  return [docs[i] for i in idx]


def load_token_lists(args, tokenizer_name: str) -> list[list[int]]:
  if args.token_ids:
    return token_ids_from_npy(args.token_ids)
  if args.texts:
    if not os.path.isfile(args.texts):
      raise ValueError(f"--texts {args.texts} not found")
    with open(args.texts, encoding="utf-8") as fh:
      texts = [line.rstrip("\n") for line in fh if line.strip()]
  else:
    texts = corpus_texts(args.num_texts)
  if not texts:
    raise ValueError(f"no non-empty text in {args.texts}")
  tok = get_tokenizer(tokenizer_name)
  return [ids[: args.max_length] for ids in tok.encode_batch(texts)]


# ------------------------------------------------------------------------------------------------- plots
def density_norm(summaries: Sequence[dict[str, Any]]):
  """One log colour scale for the density of several heatmaps (condensed layers pile most mass into a few bins
  near 1); None if no histogram has mass."""
  from matplotlib.colors import LogNorm

  positive = np.concatenate([np.asarray(s["histograms"]["density"], float).ravel() for s in summaries])
  positive = positive[positive > 0]
  return LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max()) if positive.size else None


def _heatmap(ax, summary: dict[str, Any], title: str, norm=None, legend: bool = True):
  """Layers x cosine with density as colour, and the per-layer mean; `norm`: a shared colour scale (default: this
  summary's own)."""
  from matplotlib.ticker import MaxNLocator

  hist = summary["histograms"]
  density_NxK = np.asarray(hist["density"], float)
  norm = density_norm([summary]) if norm is None else norm
  n = density_NxK.shape[0]
  im = ax.imshow(
      np.ma.masked_equal(density_NxK.T, 0),
      origin="lower",
      aspect="auto",
      norm=norm,
      cmap="viridis",
      extent=(-0.5, n - 0.5, hist["bin_edges"][0], hist["bin_edges"][-1]),
      interpolation="nearest",
  )
  ax.plot(range(n), summary["mean_cossim_by_layer"], ".-", color="tab:red", lw=1, label="mean (with diagonal)")
  ax.set(xlabel="layer (0 = embeddings)", ylabel="token-token cosine similarity", title=title)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if legend:
    ax.legend(loc="lower left", fontsize=7)
  return im


def fmt(x: float | None) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _means(ax, summary: dict[str, Any], label: str, color: str | None = None) -> None:
  from matplotlib.ticker import MaxNLocator

  n = len(summary["mean_cossim_by_layer"])
  ax.plot(
      range(n),
      summary["mean_cossim_by_layer"],
      "o-",
      color=color,
      label=f"{label} (spearman {fmt(summary['spearman'])}, kendall {fmt(summary['kendall'])})",
  )
  ax.plot(
      range(n),
      summary["mean_cossim_by_layer_offdiag"],
      "s--",
      color=color,
      alpha=0.6,
      label=f"{label} off-diagonal (spearman {fmt(summary['spearman_offdiag'])})",
  )
  ax.set(xlabel="layer (0 = embeddings)", ylabel="mean cosine similarity")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def write_plots(summary: dict[str, Any], out_dir: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  fig.colorbar(_heatmap(ax, summary, title), ax=ax, label="density")
  fig.savefig(os.path.join(out_dir, FILES["heatmap"]), dpi=120, bbox_inches="tight")
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  _means(ax, summary, "mean")
  ax.set_title(title)
  fig.savefig(os.path.join(out_dir, FILES["mean"]), dpi=120, bbox_inches="tight")
  plt.close(fig)


def write_compare(summaries: Sequence[dict[str, Any]], labels: Sequence[str], out_dir: str) -> str:
  """m_l of both runs overlaid, and both heatmaps side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), layout="constrained")
  for s, label, color in zip(summaries, labels, ("tab:blue", "tab:orange")):
    _means(axes[0], s, label, color)
  axes[0].set_title("mean cosine similarity vs depth")
  for ax, s, label in zip(axes[1:], summaries, labels):
    im = _heatmap(ax, s, label)
    if im is not None:
      fig.colorbar(im, ax=ax, label="density")
  path = os.path.join(out_dir, FILES["compare"])
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def read_summary(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ValueError(f"--compare {path} not found")
  try:
    with open(path) as fh:
      s = json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"--compare {path} is not JSON ({e.msg})") from None
  need = ("mean_cossim_by_layer", "mean_cossim_by_layer_offdiag", "histograms", "spearman", "kendall")
  if not isinstance(s, dict) or any(k not in s for k in need):
    raise ValueError(f"--compare {path} is not a condensation.json (needs {', '.join(need)})")
  return s
