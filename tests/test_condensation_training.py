"""Condensation over training: every checkpoint's statistics equal model_statistics of that checkpoint, are cached
per run + step + settings, and are drawn and tabulated; the command line answers --help and one-line errors."""

import csv
import json

import numpy as np
import pytest

from dispersion_jax.cli import condensation_training as cli
from dispersion_jax.evaluation import condensation as cond
from dispersion_jax.research import condensation_training as ct

IDS = np.random.default_rng(0).integers(0, 128, (3, 40))  # preset "test": vocab 128, n_positions 32, 2 layers


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("ids") / "ids.npy"
  np.save(path, IDS)
  return str(path)


def _checkpoint(workdir, step: int, seed: int):
  """A checkpoint like the make_run fixture's, with another init seed (make_run always uses seed 0)."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.training.checkpoint import Checkpointer
  from dispersion_jax.training.optim import make_optimizer
  from dispersion_jax.training.train_step import init_state

  cfg = config_lib.default_config()
  cfg.model.preset = "test"
  model_cfg = config_lib.model_config(cfg)
  state = init_state(model_cfg, make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), seed)
  ckpt = Checkpointer(str(workdir), max_to_keep=None, async_save=False)
  ckpt.save(step, state, None, cfg.to_dict())
  ckpt.close()
  return model_cfg, state.params


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Run a: steps 1 and 5 (different parameters); run b: step 5 only."""
  tmp = tmp_path_factory.mktemp("runs")
  params = {}
  model_cfg, params[("a", 1)] = _checkpoint(tmp / "a", 1, seed=0)
  params[("a", 5)] = _checkpoint(tmp / "a", 5, seed=1)[1]
  params[("b", 5)] = _checkpoint(tmp / "b", 5, seed=2)[1]
  return tmp, model_cfg, params


def test_statistics_of_every_checkpoint_equal_model_statistics(tmp_path, make_run):
  model_cfg, params1 = make_run(tmp_path / "run", 1)
  _, params2 = _checkpoint(tmp_path / "run", 3, seed=1)
  tokens = IDS.tolist()
  result = ct.over_training([str(tmp_path / "run")], lambda tok: tokens, max_length=64, labels=["run"])
  (run,) = result["runs"]
  assert run["steps"] == [1, 3] and run["tokenizer"] == "gpt2"
  for step, params in ((1, params1), (3, params2)):
    want = cond.model_statistics(model_cfg, params, tokens, max_length=64)
    got = run["summaries"][step]
    np.testing.assert_allclose(got["mean_cossim_by_layer"], want["mean_cossim_by_layer"], atol=1e-6)
    np.testing.assert_allclose(got["histograms"]["counts"], want["histograms"]["counts"], atol=2)
    assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-6)
    assert got["num_tokens"] == 3 * 32 and got["settings"]["step"] == step
  # The two checkpoints hold different parameters: their statistics differ (the steps were not mixed up).
  assert not np.allclose(run["summaries"][1]["mean_cossim_by_layer"], run["summaries"][3]["mean_cossim_by_layer"])


def test_cache_per_step_and_settings(two_runs, monkeypatch):
  tmp, _, _ = two_runs
  tokens = IDS.tolist()
  first = ct.over_training([str(tmp / "a")], lambda tok: tokens, max_length=16)

  def boom(*a, **k):
    raise AssertionError("recomputed instead of read from the cache")

  with monkeypatch.context() as m:
    m.setattr(ct, "model_statistics", boom)
    again = ct.over_training([str(tmp / "a")], lambda tok: tokens, max_length=16)
    assert again["runs"][0]["summaries"] == first["runs"][0]["summaries"]
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: another cache entry
      ct.over_training([str(tmp / "a")], lambda tok: tokens, max_length=8)
    with pytest.raises(AssertionError, match="recomputed"):  # other texts
      ct.over_training([str(tmp / "a")], lambda tok: tokens[:2], max_length=16)
  key = ct.settings_key(tokens, max_length=16, batch_size=8, num_bins=cond.NUM_BINS)
  assert sorted(p.name for p in (tmp / "a" / ct.CACHE_DIR / key).iterdir()) == ["step_1.json", "step_5.json"]


def test_step_selection():
  assert ct.pick_steps([10, 20, 30, 40, 50], max_checkpoints=3) == [10, 30, 50]
  assert ct.pick_steps([10, 20, 30, 40, 50], only=[20, 50, 70]) == [20, 50]
  assert ct.pick_steps([10, 20], max_checkpoints=5) == [10, 20]
  assert ct.pick_steps(list(range(1, 11)), max_checkpoints=1) == [1]


def test_cli_figures_and_tables(two_runs, ids_file, tmp_path, capsys):
  tmp, model_cfg, params = two_runs
  out = tmp_path / "out"
  cli.main(
      [
          "--workdirs",
          str(tmp / "a"),
          str(tmp / "b"),
          "--labels",
          "baseline,dispersion",
          "--token_ids",
          ids_file,
          "--max_length",
          "32",
          "--out",
          str(out),
      ]
  )
  assert "baseline: spearman by step 1:" in capsys.readouterr().out
  for f in ct.FILES.values():
    assert (out / f).stat().st_size > 0, f
  saved = json.loads((out / ct.FILES["json"]).read_text())
  assert [r["label"] for r in saved["runs"]] == ["baseline", "dispersion"]
  assert saved["runs"][0]["steps"] == [1, 5] and saved["runs"][1]["steps"] == [5]
  with open(out / ct.FILES["csv"]) as fh:
    rows = list(csv.DictReader(fh))
  assert [(r["run"], r["step"]) for r in rows] == [("baseline", "1"), ("baseline", "5"), ("dispersion", "5")]
  want = cond.model_statistics(model_cfg, params[("b", 5)], IDS.tolist(), max_length=32)
  np.testing.assert_allclose([float(rows[2][f"layer_{i}"]) for i in range(3)], want["mean_cossim_by_layer"], atol=1e-6)
  md = (out / ct.FILES["md"]).read_text()
  assert f"| dispersion | 5 | {want['mean_cossim_by_layer'][0]:+.3f} |" in md
  # --steps and --max_checkpoints
  cli.main(
      [
          "--workdirs",
          str(tmp / "a"),
          "--token_ids",
          ids_file,
          "--max_length",
          "32",
          "--out",
          str(tmp_path / "o2"),
          "--steps",
          "5",
      ]
  )
  assert json.loads((tmp_path / "o2" / ct.FILES["json"]).read_text())["runs"][0]["steps"] == [5]


def _err(argv, match, capsys):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  msg = capsys.readouterr().err.strip()
  assert e.value.code == 2 and match in msg and "\n" not in msg, msg


def test_cli_help_and_one_line_errors(two_runs, ids_file, tmp_path, capsys):
  tmp, _, _ = two_runs
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0 and "--workdirs" in capsys.readouterr().out
  data = ["--token_ids", ids_file, "--max_length", "32", "--out", str(tmp_path / "o")]
  _err(["--workdirs", str(tmp / "a"), str(tmp_path / "missing"), *data], "is not a directory", capsys)
  (tmp_path / "empty").mkdir()
  _err(["--workdirs", str(tmp_path / "empty"), *data], "no checkpoint", capsys)
  _err(["--workdirs", str(tmp / "a"), "--steps", "7", *data], "none of the steps", capsys)
  _err(["--workdirs", str(tmp / "a"), str(tmp / "b"), "--labels", "one", *data], "--labels", capsys)
  _err(["--workdirs", str(tmp / "a"), "--corpus", "default", "--max_length", "8", "--out", "o"], "--num_texts", capsys)
  _err(["--workdirs", str(tmp / "a"), "--steps", "x", *data], "--steps", capsys)
  assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked
