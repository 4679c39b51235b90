"""The results table: checkpoint selection (last / best val loss / best test mean), mean ± sample std over seeds,
the delta to the CE-only reference, Markdown and LaTeX; the per-checkpoint evaluation on checkpoints written
without training (cached); the command line."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from dispersion_jax.cli import results as cli
from dispersion_jax.research import results as res
from dispersion_jax.research import results_render as render
from dispersion_jax.research import results_select as sel

GROUP_BY = ["baseline.method", "dispersion.coeff"]
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sweeps", "demo.py")
STEPS = (100, 200, 300)


def made_up_rows() -> list[dict]:
  """3 groups x 3 seeds x 3 checkpoints. Point (none, 0.1, seed 0) is built so the rules disagree: val_loss is
  lowest at step 200, the mean accuracy highest at step 100, the last checkpoint is 300."""
  rows = []
  groups = [("none", 0.0), ("none", 0.1), ("neftune", 0.0)]
  for gi, (method, coeff) in enumerate(groups):
    for seed in range(3):
      name = f"{method}_{coeff}_seed-{seed}"
      for si, step in enumerate(STEPS):
        val = 3.0 - 0.2 * si - 0.1 * gi + 0.01 * seed * (si + 1)
        a = 0.30 + 0.05 * si + 0.02 * gi + 0.01 * seed
        b = 0.50 + 0.03 * si - 0.01 * gi + 0.02 * seed
        rows.append(
            {
                "name": name,
                "seed": seed,
                "baseline.method": method,
                "dispersion.coeff": coeff,
                "step": step,
                "val_loss": val,
                "val_ppl": math.exp(val),
                "acc/arith": a,
                "acc/cloze": b,
                "acc_norm/arith": a - 0.01,
                "acc_norm/cloze": b + 0.01,
                "mean_acc": (a + b) / 2,
                "spearman": 0.9 - 0.3 * gi + 0.05 * seed,
            }
        )
  special = {100: (2.9, 0.9, 0.8), 200: (2.1, 0.4, 0.4), 300: (2.6, 0.5, 0.5)}
  for r in rows:
    if r["name"] == "none_0.1_seed-0":
      r["val_loss"], r["acc/arith"], r["acc/cloze"] = special[r["step"]]
      r["mean_acc"] = (r["acc/arith"] + r["acc/cloze"]) / 2
  return rows


def _pick(rows, name, step):
  return next(r for r in rows if r["name"] == name and r["step"] == step)


def test_the_three_rules_pick_different_checkpoints():
  rows = made_up_rows()
  picked = {rule: {r["name"]: r["step"] for r in sel.select(rows, rule)} for rule in ("last", "val", "test")}
  assert picked["last"]["none_0.1_seed-0"] == 300
  assert picked["val"]["none_0.1_seed-0"] == 200
  assert picked["test"]["none_0.1_seed-0"] == 100
  # Every other point: val falls and accuracy rises with the step, so all rules take the last checkpoint.
  for rule in picked:
    assert len(picked[rule]) == 9
    assert all(s == 300 for n, s in picked[rule].items() if n != "none_0.1_seed-0")
  chosen = sel.select(rows, "test")
  special = next(r for r in chosen if r["name"] == "none_0.1_seed-0")
  assert special["selected_by"] == "test" and special["selection_score"] == pytest.approx(0.85)


def test_selection_ties_take_the_earliest_step_and_missing_values_are_skipped():
  rows = [
      {"name": "p", "step": s, "val_loss": v, "acc/t": a}
      for s, v, a in ((10, 2.0, 0.5), (20, 2.0, 0.7), (30, None, 0.7), (40, float("nan"), 0.1))
  ]
  assert sel.select(rows, "val")[0]["step"] == 10  # tie at 2.0; None / NaN are not candidates
  assert sel.select(rows, "test")[0]["step"] == 20  # tie at 0.7
  assert sel.select(rows, "last")[0]["step"] == 40
  assert sel.select([{"name": "q", "step": 1, "val_loss": None, "acc/t": 0.3}], "val") == []
  with pytest.raises(ValueError, match="unknown selection rule"):
    sel.select(rows, "best")
  with pytest.raises(ValueError, match="selection metric 'acc/x'"):
    sel.select(rows, "test", select_metrics=["acc/x"])


def test_mean_and_sample_std_over_seeds_match_numpy():
  rows = made_up_rows()
  groups = sel.aggregate(sel.select(rows, "val"), GROUP_BY)
  assert [(g["baseline.method"], g["dispersion.coeff"], g["n"]) for g in groups] == [
      ("none", 0.0, 3),
      ("none", 0.1, 3),
      ("neftune", 0.0, 3),
  ]
  g = groups[1]
  assert g["steps"] == [200, 300, 300]
  for m in ("val_loss", "acc/arith", "acc/cloze", "mean_acc", "spearman", "val_ppl"):
    v = np.array([_pick(rows, f"none_0.1_seed-{s}", step)[m] for s, step in zip(range(3), (200, 300, 300))])
    assert g[m] == pytest.approx(v.mean(), rel=1e-12)
    assert g[f"{m}_std"] == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    assert g[f"{m}_std"] != pytest.approx(np.std(v, ddof=0))  # sample std, not population std
  one = sel.aggregate([rows[0]], GROUP_BY)[0]
  assert one["n"] == 1 and math.isnan(one["val_loss_std"])
  holey = [dict(r) for r in sel.select(rows, "last")]
  holey[0]["spearman"] = None  # a missing value: the group's mean is NaN, not a mean over fewer seeds
  assert math.isnan(sel.aggregate(holey, GROUP_BY)[0]["spearman"])


def test_delta_against_the_ce_only_reference():
  rows = made_up_rows()
  groups = sel.with_deltas(
      sel.aggregate(sel.select(rows, "last"), GROUP_BY), GROUP_BY, sel.DEFAULT_REFERENCE, ["val_loss", "mean_acc"]
  )
  ref, disp, nef = groups
  assert ref["is_reference"] and not disp["is_reference"] and not nef["is_reference"]
  assert disp["reference_group"] == nef["reference_group"] == ("none", 0.0)
  for g in groups:
    for m in ("val_loss", "mean_acc"):
      assert g[f"delta/{m}"] == pytest.approx(g[m] - ref[m], rel=1e-12)
  last = lambda name: np.mean([_pick(rows, f"{name}_seed-{s}", 300)["val_loss"] for s in range(3)])  # noqa: E731
  assert ref["delta/val_loss"] == 0.0
  assert disp["delta/val_loss"] == pytest.approx(last("none_0.1") - last("none_0.0")) == pytest.approx(-0.1 + 0.1 / 3)
  # A configurable reference: against neftune instead.
  alt = sel.with_deltas(
      sel.aggregate(sel.select(rows, "last"), GROUP_BY),
      GROUP_BY,
      {"baseline.method": "neftune", "dispersion.coeff": 0},
      ["val_loss"],
  )
  assert alt[2]["is_reference"] and alt[0]["delta/val_loss"] == pytest.approx(0.2)


def test_reference_per_width_and_value_matching():
  """Width study: each width's dispersion group is compared with the CE-only group of the same width; the method
  key is no grouping key there (ignored), None counts as none, 0 equals 0.0."""
  rows = [
      {
          "name": f"w{w}_c{c}_s{s}",
          "model.n_inner": w,
          "dispersion.coeff": c,
          "step": 1,
          "val_loss": 5.0 - w / 1000 - c - 0.01 * s,
      }
      for w in (64, 4096)
      for c in (0, 0.1)
      for s in (0, 1)
  ]
  keys = ["model.n_inner", "dispersion.coeff"]
  groups = sel.with_deltas(sel.aggregate(sel.select(rows, "last"), keys), keys, sel.DEFAULT_REFERENCE, ["val_loss"])
  assert [g["is_reference"] for g in groups] == [True, False, True, False]
  assert groups[1]["reference_group"] == (64, 0) and groups[3]["reference_group"] == (4096, 0)
  assert groups[3]["delta/val_loss"] == pytest.approx(-0.1)
  shuffled = [groups[i] for i in (3, 1, 2, 0)]
  assert [
      (g["model.n_inner"], g["dispersion.coeff"]) for g in render.order_groups(shuffled, keys, sel.DEFAULT_REFERENCE)
  ] == [
      (64, 0),
      (64, 0.1),
      (4096, 0),
      (4096, 0.1),
  ]  # by width, the CE-only group first
  assert sel.same(None, "none") and sel.same(0, 0.0) and sel.same("NEFTune", "neftune") and not sel.same(0.1, 0)
  none_rows = [{**r, "dispersion.coeff": None} for r in rows[:2]]  # no reference key matches: no deltas
  g = sel.with_deltas(sel.aggregate(none_rows, keys), keys, {"dispersion.coeff": 0.0}, ["val_loss"])[0]
  assert g["reference_group"] is None and math.isnan(g["delta/val_loss"])


def test_the_authors_group_rule_takes_one_step_per_group():
  rows = made_up_rows()
  for r in rows:  # group (none, 0.0): seed 2 peaks at step 200 so strongly that the seed mean peaks there too
    if r["name"] == "none_0.0_seed-2" and r["step"] == 200:
      r["acc/arith"] = r["acc/cloze"] = 1.0
  chosen = sel.select(rows, "test_group", group_by=GROUP_BY)
  steps = {}
  for r in chosen:
    steps.setdefault((r["baseline.method"], r["dispersion.coeff"]), set()).add(r["step"])
  assert steps[("none", 0.0)] == {200} and steps[("neftune", 0.0)] == {300}
  want = np.mean(
      [np.mean([_pick(rows, f"none_0.0_seed-{s}", 200)[m] for m in ("acc/arith", "acc/cloze")]) for s in range(3)]
  )
  assert chosen[0]["selection_score"] == pytest.approx(want)


def test_markdown_and_latex_render_the_numbers():
  rows = made_up_rows()
  metrics = ["val_loss", "acc/cloze", "mean_acc", "spearman"]
  tables = render.build_tables(rows, GROUP_BY, metrics=metrics)
  assert list(tables) == ["last", "val", "test"]
  g = tables["test"][1]  # (none, 0.1)
  v = np.array([_pick(rows, f"none_0.1_seed-{s}", step)["mean_acc"] for s, step in zip(range(3), (100, 300, 300))])
  r = np.array([_pick(rows, f"none_0.0_seed-{s}", 300)["mean_acc"] for s in range(3)])
  mean, std, delta = f"{100 * v.mean():.1f}", f"{100 * np.std(v, ddof=1):.1f}", f"{100 * (v.mean() - r.mean()):+.1f}"
  md = render.to_markdown(tables, GROUP_BY, metrics)
  assert "| none | 0.1 | 3 | 100, 300, 300 |" in md
  assert f"{mean} ± {std} ({delta})" in md
  assert "TEST-SET SELECTION" in md and "| none *ref* | 0 | 3 |" in md
  vl = np.array([_pick(rows, f"none_0.1_seed-{s}", 300)["val_loss"] for s in range(3)])
  assert f"{vl.mean():.3f} ± {np.std(vl, ddof=1):.3f}" in md  # the last-checkpoint table
  tex = render.to_latex(tables, GROUP_BY, metrics)
  assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 3
  assert rf"${mean} \pm {std}$ {{\scriptsize$({delta})$}}" in tex
  assert r"baseline.method & dispersion.coeff & $n$ & steps & val\_loss & acc/cloze (\%)" in tex
  assert r"TEST-SET SELECTION" in tex and "none (ref) & 0 & 3" in tex
  for line in tex.splitlines():  # every body row has as many cells as the header
    if line.endswith(r"\\"):
      assert line.count("&") == len(GROUP_BY) + 2 + len(metrics) - 1, line


def test_write_results_files(tmp_path):
  rows = made_up_rows()
  tables = res.write_results(
      rows, GROUP_BY, str(tmp_path), rules=["last", "val", "test", "test_group"], notes={"x": "left out"}
  )
  for f in (
      "results_table.md",
      "results_table.tex",
      "results_table.json",
      "results_checkpoints.csv",
      "results_selected.csv",
  ):
    assert (tmp_path / f).stat().st_size > 0
  saved = json.loads((tmp_path / "results_table.json").read_text())
  assert list(saved["tables"]) == ["last", "val", "test", "test_group"]
  assert saved["tables"]["val"][1]["val_loss"] == pytest.approx(tables["val"][1]["val_loss"])
  assert len((tmp_path / "results_checkpoints.csv").read_text().splitlines()) == 1 + 27
  assert len((tmp_path / "results_selected.csv").read_text().splitlines()) == 1 + 4 * 9
  assert "- x: left out" in (tmp_path / "results_table.md").read_text()
  with pytest.raises(ValueError, match="not in the evaluation rows"):
    res.write_results(rows, GROUP_BY, str(tmp_path), metrics=["val_lost"])


# ----------------------------------------------------------------------------------- evaluation, no training
BASE = """
from dispersion_jax.config import default_config

def get_config():
  c = default_config()
  c.model.preset = "test"
  c.model.vocab_size = 50257
  c.seq_len = 32
  c.batch_size = 8
  c.steps = 2
  c.checkpoint_every = 1
  c.max_to_keep = None
  return c
"""
SWEEP = """
from ml_collections import ConfigDict

def get_config():
  return ConfigDict({{"base": "{base}", "axes": {{"dispersion.coeff": [0.0, 0.5], "seed": [0, 1]}},
                     "eval": {{"num_texts": 3, "max_length": 16, "tasks": ["tiny"], "include_path": "{task}"}}}},
                    allow_dotted_keys=True)
"""
SWEEP2 = SWEEP.replace(
    '"axes": {{"dispersion.coeff": [0.0, 0.5], "seed": [0, 1]}}',
    '"overrides": {{"dispersion.coeff": 0.0}}, "axes": {{"seed": [0]}}',
)
TASK = [
    {"context": "One plus one is", "choices": [" two", " three"], "gold": 0},
    {"context": "The sky is", "choices": [" blue", " loud", " seven"], "gold": 0},
    {"context": "Water is", "choices": [" wet", " dry"], "gold": 0},
]
TASK_YAML = """task: tiny
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {path}}}}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""


def _write_point(workdir, seeds_by_step: dict[int, int]):
  """A finished point as train.py leaves it, without training: checkpoints (GPT-2 vocabulary, preset "test"
  shapes, different init seeds per step) and the evaluation rows of metrics.jsonl."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.training.checkpoint import Checkpointer
  from dispersion_jax.training.optim import make_optimizer
  from dispersion_jax.training.train_step import init_state

  cfg = config_lib.default_config()
  cfg.model.preset, cfg.model.vocab_size = "test", 50257
  model_cfg = config_lib.model_config(cfg)
  ckpt = Checkpointer(str(workdir), max_to_keep=None, async_save=False)
  for step, seed in seeds_by_step.items():
    ckpt.save(
        step,
        init_state(model_cfg, make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), seed),
        None,
        cfg.to_dict(),
    )
  ckpt.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    for step in seeds_by_step:
      fh.write(json.dumps({"step": step, "loss": 9.0 + step, "ce": 9.0 + step}) + "\n")
      fh.write(
          json.dumps(
              {"step": step, "val_loss": 10.0 - step - seeds_by_step[step] / 10, "val_ppl": 1.0, "val_dispersion": -0.1}
          )
          + "\n"
      )


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fake_sweep")
  (tmp / "base.py").write_text(BASE)
  (tmp / "tasks").mkdir()
  (tmp / "tasks" / "tiny.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASK))
  (tmp / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(path=tmp / "tasks" / "tiny.jsonl"))
  (tmp / "sweep.py").write_text(SWEEP.format(base=tmp / "base.py", task=tmp / "tasks"))
  runs = tmp / "runs"
  _write_point(runs / "coeff-0.0_seed-0", {1: 0, 2: 1})
  _write_point(runs / "coeff-0.0_seed-1", {1: 2, 2: 3})
  _write_point(runs / "coeff-0.5_seed-0", {1: 4, 2: 5})  # coeff-0.5_seed-1 never started: left out
  return tmp


def test_every_checkpoint_evaluated_cached_and_tabulated(fake_sweep, monkeypatch, capsys):
  config, runs, out = str(fake_sweep / "sweep.py"), str(fake_sweep / "runs"), fake_sweep / "out"
  rows, group_by, notes = res.collect(config, runs, max_checkpoints=2)
  assert group_by == ["dispersion.coeff"] and list(notes) == ["coeff-0.5_seed-1"]
  assert sorted((r["name"], r["step"]) for r in rows) == [
      ("coeff-0.0_seed-0", 1),
      ("coeff-0.0_seed-0", 2),
      ("coeff-0.0_seed-1", 1),
      ("coeff-0.0_seed-1", 2),
      ("coeff-0.5_seed-0", 1),
      ("coeff-0.5_seed-0", 2),
  ]
  r = next(r for r in rows if r["name"] == "coeff-0.0_seed-1" and r["step"] == 2)
  assert r["val_loss"] == pytest.approx(10.0 - 2 - 0.3) and r["train_ce"] == pytest.approx(10.5)  # rows 1..2
  for k in ("acc/tiny", "acc_norm/tiny", "mean_acc", "spearman", "kendall"):
    assert k in r
  assert r["mean_acc"] == r["acc/tiny"] and r["acc/tiny"] * 3 == pytest.approx(round(r["acc/tiny"] * 3))
  assert len(r["mean_cos_by_layer"]) == 3
  # Different checkpoints, different condensation: each step was measured on its own parameters.
  assert (
      r["mean_cos_by_layer"]
      != next(x for x in rows if x["name"] == "coeff-0.0_seed-1" and x["step"] == 1)["mean_cos_by_layer"]
  )

  def boom(*a, **k):
    raise AssertionError("evaluated again instead of read from the cache")

  monkeypatch.setattr(res.evaluate, "run_harness", boom)
  monkeypatch.setattr(res.ct, "model_statistics", boom)
  again, _, _ = res.collect(config, runs, steps=[2])
  assert [a["val_loss"] for a in again] == [r["val_loss"] for r in rows if r["step"] == 2]
  # Several sweep configs in one sweep_dir: a point seen twice (same workdir, or same run config) counts once.
  shutil.copytree(os.path.join(runs, "coeff-0.0_seed-0"), os.path.join(runs, "seed-0"))
  (fake_sweep / "again.py").write_text(SWEEP2.format(base=fake_sweep / "base.py", task=fake_sweep / "tasks"))
  both, keys, notes = res.collect([config, str(fake_sweep / "again.py")], runs, steps=[2])
  assert [b["name"] for b in both] == [a["name"] for a in again] and keys == ["dispersion.coeff"]
  assert notes["seed-0"] == "the same run config as coeff-0.0_seed-0: counted once"
  capsys.readouterr()
  cli.main(
      [
          "--sweep_dir",
          runs,
          "--config",
          config,
          "--out",
          str(out),
          "--rules",
          "last,val,test_group",
          "--metrics",
          "val_loss,mean_acc",
      ]
  )
  printed = capsys.readouterr().out
  assert "Checkpoint selection `val`" in printed and "coeff-0.5_seed-1: not finished" in printed
  md = (out / "results_table.md").read_text()
  # val: seed 0 at step 2 (7.9) and seed 1 at step 2 (7.7), for coeff 0; mean 7.800 ± 0.141
  assert "| 0 *ref* | 2 | 2, 2 | 7.800 ± 0.141 |" in md
  assert "| 0.5 | 1 | 2 | 7.500 (-0.300) |" in md


def test_results_cli_help_and_one_line_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0 and "--sweep_dir" in capsys.readouterr().out
  for argv, match in (
      (["--sweep_dir", str(tmp_path / "missing"), "--config", DEMO], "is not a directory"),
      (["--sweep_dir", str(tmp_path), "--config", str(tmp_path / "nope.py")], "not found"),
      (["--sweep_dir", str(tmp_path), "--config", DEMO, "--rules", "best"], "--rules"),
      (["--sweep_dir", str(tmp_path), "--config", DEMO, "--reference", "coeff"], "KEY=VALUE"),
      (["--sweep_dir", str(tmp_path), "--config", DEMO, "--group_by", "dispersion.cof"], "not a run config key"),
      (["--sweep_dir", str(tmp_path), "--config", DEMO], "no finished point"),
  ):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and "\n" not in err, (argv, err)
