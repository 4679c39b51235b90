"""Sweeps: vmapped members train exactly like their individual runs; the runner skips, resumes and reports."""

import csv
import json
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models: deselect with -m 'not slow'

from dispersion_jax.evaluation import evaluate
from dispersion_jax.research import sweep
from dispersion_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = """
from ml_collections import ConfigDict

def get_config():
  return ConfigDict({{
      "base": "configs/gpt2_tiny.py",
      "overrides": {{"model.n_layer": 2, "model.n_embd": 32, "model.n_head": 4, "model.n_positions": 32,
                    "seq_len": 32, "batch_size": 8, "steps": 4, "checkpoint_every": 2, "log_every": 1,
                    "eval_every": 4, "eval_batches": 1, "optimizer.lr": 3e-3, "data.data_dir": "{data_dir}"}},
      "axes": {{"dispersion.coeff": [0.0, 0.5], "seed": [0, 1]}},
      "eval": {{"num_texts": 4, "max_length": 32}},
  }}, allow_dotted_keys=True)
"""
KEYS = ("loss", "ce", "dispersion")


def train_rows(workdir: str) -> dict[int, tuple[float, ...]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == sorted(set(steps)), f"{workdir}: steps logged twice (restarted instead of resumed): {steps}"
  return {r["step"]: tuple(r[k] for k in KEYS) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """Individual reference runs, then: vmapped sweep stopped at step 2, one point finished alone, sweep resumed."""
  tmp = tmp_path_factory.mktemp("sweep")
  config = tmp / "tiny_sweep.py"
  config.write_text(SWEEP.format(data_dir=tmp / "tfds"))
  one = jax.devices()[:1]
  points = {p.name: p for p in sweep.expand(sweep.load_sweep(str(config)), str(tmp / "runs"))}
  refs = {}
  for name in ("coeff-0.0_seed-0", "coeff-0.5_seed-1"):  # coeff 0 beside coeff > 0; a second data stream
    cfg = points[name].cfg.copy_and_resolve_references()
    cfg.eval_every = 0
    refs[name] = str(tmp / "ref" / name)
    train.run(cfg, refs[name], devices=one)
  sweep.run_sweep(str(config), str(tmp / "runs"), vmap=True, stop_at=2, evaluate=False, devices=one)
  alone = points["coeff-0.5_seed-0"]
  assert sweep.latest_step(alone.workdir) == 2
  train.run(alone.cfg, alone.workdir, devices=one)  # finished outside the sweep: must be skipped
  with open(os.path.join(alone.workdir, "metrics.jsonl")) as fh:
    before = fh.read()
  rows = sweep.run_sweep(str(config), str(tmp / "runs"), vmap=True, devices=one)
  return {"tmp": tmp, "points": points, "refs": refs, "rows": rows, "alone_before": before}


def test_vmapped_members_match_their_individual_runs(swept):
  for name, ref in swept["refs"].items():
    a, b = train_rows(ref), train_rows(swept["points"][name].workdir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]  # steps 1-2 vmapped, 3-4 vmapped after a resume
    np.testing.assert_allclose(
        np.array([b[s] for s in sorted(b)]), np.array([a[s] for s in sorted(a)]), rtol=1e-5, atol=1e-7, err_msg=name
    )


def test_runner_skips_finished_points_and_resumes_interrupted_ones(swept):
  alone = swept["points"]["coeff-0.5_seed-0"]
  with open(os.path.join(alone.workdir, "metrics.jsonl")) as fh:
    assert fh.read() == swept["alone_before"]  # not retrained
  for p in swept["points"].values():
    assert sorted(train_rows(p.workdir)) == [1, 2, 3, 4] and sweep.latest_step(p.workdir) == 4


def test_results_have_one_row_per_point_and_seed_means(swept):
  runs = swept["tmp"] / "runs"
  with open(runs / "results.csv") as fh:
    rows = list(csv.DictReader(fh))
  assert [r["name"] for r in rows] == ["coeff-0.0_seed-0", "coeff-0.0_seed-1", "coeff-0.5_seed-0", "coeff-0.5_seed-1"]
  for r in rows:
    assert r["status"] == "finished" and r["step"] == "4"
    assert np.isfinite(float(r["val_loss"])) and -1 <= float(r["spearman"]) <= 1 and 0 <= float(r["mean_acc"]) <= 1
  md = (runs / "results.md").read_text()
  assert "| 0.0 | 2 |" in md and "| 0.5 | 2 |" in md and "±" in md
  assert (runs / "sweep_summary.png").stat().st_size > 0 and (runs / "condensation_by_layer.png").stat().st_size > 0
  # The perplexity hook reproduces the training job's final validation loss (same batches through the pipeline).
  p = swept["points"]["coeff-0.5_seed-1"]
  model_cfg, params, _ = evaluate.load_model(p.workdir)
  pp = evaluate.perplexity(model_cfg, params, p.cfg, num_batches=p.cfg.eval_batches, batch_size=p.cfg.batch_size)
  logged = [r for r in swept["rows"] if r["name"] == p.name][0]["val_loss"]
  np.testing.assert_allclose(pp["loss"], logged, rtol=1e-5)


def test_expand_names_points_and_applies_axes():
  plan = sweep.load_sweep(os.path.join(REPO, "configs/sweeps/demo.py"))
  assert list(plan["axes"])[-1] == "seed"
  points = sweep.expand(plan, "root")
  assert len(points) == np.prod([len(v) for v in plan["axes"].values()])
  assert len({p.workdir for p in points}) == len(points)
  for p in points:
    assert p.cfg.seed == p.values["seed"] and p.cfg.dispersion.coeff == p.values["dispersion.coeff"]
  groups = sweep.group_rows(
      [
          {"name": "a", "x": 1.0, "seed": 0, "status": "finished", "val_loss": 2.0},
          {"name": "b", "x": 1.0, "seed": 1, "status": "finished", "val_loss": 4.0},
      ],
      ["x", "seed"],
  )
  assert groups == [
      {"x": 1.0, "n": 2, "val_loss": 3.0, "val_loss_std": pytest.approx(np.sqrt(2)), "mean_cos_by_layer": None}
  ]
