"""Which settings a resume may change: a changed model or meaning of the saved state is refused in one line naming
the flags that keep the run's values; the objective and the optimizer may change, announced and recorded."""

import re
import shutil

import pytest

from dispersion_jax import config as config_lib
from dispersion_jax.errors import ConfigError
from dispersion_jax.training import resume, saved_run

from command_helpers import (
  CONFIG,
  history,
)
from conftest import TINY, tiny_cfg


@pytest.mark.slow
def test_a_changed_model_is_refused_on_resume_and_a_changed_objective_is_announced(trained, tmp_path, data_dir, capsys):
  """n_head=8 on a run trained with 4 heads has the same weight shapes: it used to train on silently and record
  n_head=8 for the whole run."""
  from dispersion_jax.cli.train import main as train_main
  from dispersion_jax.training import train

  src, flags = trained
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  argv = ["--config", CONFIG, "--workdir", str(workdir), *TINY, *flags, f"--config.data.data_dir={data_dir}"]
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    train_main([*argv, "--config.steps=14", "--config.model.n_head=8", "--config.seed=3"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(err) == 1, err
  assert "model.n_head (checkpoint 4, now 8), seed (checkpoint 0, now 3)" in err[0]
  assert "--config.model.n_head=4 --config.seed=0" in err[0]
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # nothing written
  # The dispersion term (and the optimizer's settings) may change on purpose: announced, recorded, trained.
  cfg = tiny_cfg(data_dir, *flags, "--config.steps=14", "--config.dispersion.coeff=0.5", "--config.optimizer.lr=1e-3")
  assert train.run(cfg, str(workdir)) == 14
  out = capsys.readouterr().out
  assert (
      "warning: the run trains with other settings from step 13 on (dispersion.coeff 0.1 -> 0.5, optimizer.lr "
      "0.003 -> 0.001)" in out
  ), out
  assert "resuming from step 12 with changed settings: steps 12 -> 14" in out
  (resume,) = [r for r in history(workdir) if r["kind"] == "resume"]
  assert resume["step"] == 12
  assert resume["changed"] == {"dispersion.coeff": [0.1, 0.5], "optimizer.lr": [0.003, 0.001], "steps": [12, 14]}
  saved = saved_run.load_run_config(str(workdir))
  assert (saved.steps, saved.dispersion.coeff) == (14, 0.5)



def _saved_and_new(*overrides: str):
  saved = config_lib.load(CONFIG, [o.removeprefix("--config.") for o in TINY])
  new = config_lib.load(CONFIG, [o.removeprefix("--config.") for o in [*TINY, *overrides]])
  return config_lib.from_saved(saved.to_dict()), new


def test_resume_changes_refuses_what_changes_the_model_or_the_state_and_names_the_flags():
  for flag, key in [
      ("--config.model.n_head=8", "model.n_head"),
      ("--config.seq_len=16", "seq_len"),
      ("--config.seed=1", "seed"),
      ("--config.tokenizer=other", "tokenizer"),
      ("--config.optimizer.clip=None", "optimizer.clip"),
      ("--config.baseline.method=neftune", "baseline.method"),
      ("--config.data.source=text_dir", "data.source"),
      ("--config.model.dtype=bfloat16", "model.dtype"),
  ]:
    saved, new = _saved_and_new(flag)
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
      resume.resume_changes(saved, new, "the checkpoint")
    assert "\n" not in str(e.value) and f"--config.{key}=" in str(e.value)


def test_resume_changes_accepts_length_cadence_layout_and_dispersion():
  allowed = [
      "--config.steps=99",
      "--config.log_every=3",
      "--config.eval_every=7",
      "--config.checkpoint_every=5",
      "--config.max_to_keep=None",
      "--config.batch_size=16",
      "--config.grad_accum=2",
      "--config.mesh.data=2",
      "--config.model.remat=full",
      "--config.data.read_threads=0",
      "--config.data.cache_dir=/elsewhere",
      "--config.dispersion.coeff=0.5",
      "--config.dispersion.impl=reference",
      "--config.optimizer.lr=1e-4",
      "--config.optimizer.clip=0.5",
  ]
  saved, new = _saved_and_new(*allowed)
  changed = resume.resume_changes(saved, new, "the checkpoint")
  assert set(changed) == {a.removeprefix("--config.").split("=")[0] for a in allowed}
  assert changed["dispersion.coeff"] == (0.1, 0.5)
  # The same model spelled differently (the preset's own value left to the preset): no change.
  saved, new = _saved_and_new("--config.model.n_head=None")  # the tiny preset has 4 heads too
  assert resume.resume_changes(saved, new, "the checkpoint") == {}
