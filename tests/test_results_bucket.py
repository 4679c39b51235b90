"""The results command over a sweep whose runs live in a bucket (gs://, a GCS emulator on loopback): it reads the
runs' histories and checkpoints there, caches its evaluations there, writes its tables there, and the tables equal
those of the same runs on a local disk. (The runs are written without training, as test_results.py does.)"""

import json

import pytest

from dispersion_jax.cli import results as cli
from dispersion_jax.evaluation import evaluate
from dispersion_jax.storage import lines, paths
from test_results import BASE, SWEEP, TASK, TASK_YAML

TABLES = ("results_table.md", "results_table.tex", "results_table.json", "results_checkpoints.csv")


def write_point(workdir: str, seed: int) -> None:
  """A finished point as train.py leaves it (local or gs://): the checkpoint of its last step (2) and its history."""
  from dispersion_jax import config as config_lib  # noqa: PLC0415
  from dispersion_jax.training.checkpoint import Checkpointer  # noqa: PLC0415
  from dispersion_jax.training.optim import make_optimizer  # noqa: PLC0415
  from dispersion_jax.training.train_step import init_state  # noqa: PLC0415

  cfg = config_lib.default_config()
  cfg.model.preset, cfg.model.vocab_size = "test", 50257
  state = init_state(config_lib.model_config(cfg), make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), seed)
  ckpt = Checkpointer(workdir, max_to_keep=None, async_save=False)
  ckpt.save(2, state, None, cfg.to_dict())
  ckpt.close()
  rows = [{"step": s, "loss": 9.0 + s, "ce": 9.0 + s} for s in (1, 2)]
  rows.append({"step": 2, "val_loss": 8.0 - seed / 10, "val_ppl": 1.0, "val_dispersion": -0.1})
  lines.LineLog(lines.location(workdir, "metrics.jsonl")).replace([json.dumps(r) + "\n" for r in rows])


@pytest.fixture
def sweep_config(tmp_path):
  (tmp_path / "base.py").write_text(BASE)
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASK))
  (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(path=tmp_path / "tasks" / "tiny.jsonl"))
  one_seed = SWEEP.replace('"seed": [0, 1]', '"seed": [0]')  # two points: coeff 0 (the reference) and 0.5
  (tmp_path / "sweep.py").write_text(one_seed.format(base=tmp_path / "base.py", task=tmp_path / "tasks"))
  return str(tmp_path / "sweep.py")


def test_results_over_runs_in_a_bucket_equal_the_same_runs_on_a_local_disk(
    gcs, tmp_path, sweep_config, capsys, monkeypatch
):
  # The harness columns are test_results.py's question (and indexing lm-eval's tasks takes ~30 s here): stubbed.
  monkeypatch.setattr(evaluate, "checkpoint_task_columns", lambda *a, **k: {"acc/tiny": 0.5, "mean_acc": 0.5})
  local, bucket = str(tmp_path / "runs"), gcs.prefix("sweep")
  for root in (local, bucket):
    for seed, name in enumerate(("coeff-0.0_seed-0", "coeff-0.5_seed-0")):
      write_point(paths.join(root, name), seed)
    cli.main(["--sweep_dir", root, "--config", sweep_config, "--rules", "last,val"])  # tables into --sweep_dir
  printed = capsys.readouterr().out
  assert printed.count("| 0 *ref* |") == 4 and printed.count("| 0.5 |") == 4  # 2 runs x 2 rules, both groups

  for name in TABLES:
    want = paths.read_text(paths.join(local, name)).replace(local, "SWEEP_DIR")
    got = paths.read_text(paths.join(bucket, name))
    assert got is not None and got.replace(bucket, "SWEEP_DIR") == want, name
  # the evaluations are cached beside the checkpoints, in the bucket
  assert paths.names(paths.join(bucket, "coeff-0.5_seed-0", "results_eval"))
  assert not (tmp_path / "gs:").exists()
