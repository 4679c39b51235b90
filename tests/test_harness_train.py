"""eval.tasks during training: the harness runs on the live parameters and logs lm_eval/TASK/METRIC rows, which
are the numbers an offline evaluation of the saved checkpoint gives, and which the results table reads."""

import json
import os

import pytest

pytest.importorskip("lm_eval")

from dispersion_jax.cli import evaluate as ev_cli  # noqa: E402
from dispersion_jax.errors import ConfigError  # noqa: E402
from dispersion_jax.evaluation import evaluate as ev  # noqa: E402
from dispersion_jax.training import train  # noqa: E402

from conftest import tiny_cfg  # noqa: E402

FLAGS = ["--config.model.vocab_size=50257", "--config.steps=4", "--config.eval_every=2", "--config.eval_batches=1"]
FLAGS += ["--config.checkpoint_every=2", "--config.eval.tasks=example_cloze", "--config.eval.limit=4"]


@pytest.mark.slow
def test_training_logs_harness_metrics_that_the_results_table_reads(tmp_path, data_dir, monkeypatch, capsys):
  cfg = tiny_cfg(data_dir, *FLAGS, "--config.eval.every=4")
  workdir = str(tmp_path / "run")
  train.run(cfg, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = {r["step"]: r for r in rows if "val_loss" in r}
  assert sorted(evals) == [2, 4]
  assert not any(k.startswith("lm_eval/") for k in evals[2])  # eval.every=4: not at step 2
  logged = {k: v for k, v in evals[4].items() if k.startswith("lm_eval/")}
  assert set(logged) == {"lm_eval/example_cloze/acc", "lm_eval/example_cloze/acc_norm"}
  # The same numbers as the harness on the saved checkpoint, offline.
  offline = ev_cli.run(
      ev_cli.parse_args(["--workdir", workdir, "--tasks", "example_cloze", "--limit", "4", "--bootstrap_iters", "0"])
  )
  assert offline["results"]["example_cloze"]["acc,none"] == logged["lm_eval/example_cloze/acc"]
  assert offline["results"]["example_cloze"]["acc_norm,none"] == logged["lm_eval/example_cloze/acc_norm"]

  # The results table's columns come from the logged row, without running the harness again.
  def boom(*a, **k):
    raise AssertionError("ran the harness instead of reading the run's own lm_eval rows")

  monkeypatch.setattr(ev, "run_harness", boom)
  model_cfg, params, tok = ev.load_model(workdir, 4)
  cols = ev.checkpoint_task_columns(model_cfg, params, tok, {"tasks": ["example_cloze"]}, evals[4])
  assert cols == {
      "acc/example_cloze": logged["lm_eval/example_cloze/acc"],
      "acc_norm/example_cloze": logged["lm_eval/example_cloze/acc_norm"],
      "mean_acc": logged["lm_eval/example_cloze/acc"],
      "mean_acc_norm": logged["lm_eval/example_cloze/acc_norm"],
  }


def test_eval_config_errors_name_the_key(data_dir):
  from dispersion_jax import config as config_lib

  for flags, match in [
      (["--config.eval.tasks=piqa", "--config.eval_every=0"], "set eval_every"),
      (["--config.eval.tasks=piqa", "--config.eval_every=2", "--config.eval.every=3"], "multiple of eval_every"),
      (["--config.eval.limit=0"], "eval.limit=0"),
      (["--config.eval.include_path=/no/such/dir"], "eval.include_path"),
  ]:
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(tiny_cfg(data_dir, *flags))
