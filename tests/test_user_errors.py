"""Every user error of every command is one line `error: ...`, exit 2, no traceback or object repr, and creates
nothing. The cases are one parametrized table."""

import os
import pathlib
import shlex

import pytest

from command_helpers import (
  CONFIG,
  one_line_error,
  run_python,
  train_cmd,
  tree,
)
from conftest import REPO, TINY, write_run


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
  """A run whose newest checkpoint has a truncated array file (as a full disk or a copy cut short leaves it)."""
  workdir = tmp_path_factory.mktemp("damaged") / "run"
  write_run(workdir, 3)
  arrays = sorted((workdir / "checkpoints/3/state").rglob("d/*"), key=lambda p: p.stat().st_size)
  big = arrays[-1]
  with open(big, "r+b") as fh:
    fh.truncate(big.stat().st_size // 2)
  return workdir


def _cases(tmp: pathlib.Path, damaged: pathlib.Path) -> dict:
  empty, text = tmp / "empty", tmp / "text"
  data = [
      "--config.data.source=text_dir",
      f"--config.data.text_dir={text}",
      f"--config.data.cache_dir={tmp / 'my cache'}",
  ]
  return {
      "evaluate, no checkpoint": (
          ["-m", "dispersion_jax", "eval", "--workdir", str(empty)],
          f"error: no checkpoint in {empty}/checkpoints; train first",
      ),
      "evaluate, truncated checkpoint": (
          ["-m", "dispersion_jax", "eval", "--workdir", str(damaged)],
          "cannot be restored (ValueError: OUT_OF_RANGE",
      ),
      "train, unbuilt text_dir": (
          train_cmd(tmp / "new run", *data)[1:],
          "build it with `python -m dispersion_jax data-build --config "
          + " ".join(map(shlex.quote, [CONFIG, *TINY, *data]))
          + "`",
      ),
      "data build, no input": (
          [
              "-m",
              "dispersion_jax", "data-build",
              "--config",
              CONFIG,
              "--config.data.source=text_dir",
              f"--config.data.text_dir={tmp / 'none'}",
              f"--config.data.cache_dir={tmp / 'c'}",
          ],
          "does not exist",
      ),
      "condensation, no checkpoint": (
          [
              "-m",
              "dispersion_jax", "condensation",
              "--workdir",
              str(empty),
              "--corpus",
              "default",
              "--num_texts",
              "2",
              "--max_length",
              "16",
              "--out",
              str(tmp / "out"),
          ],
          "no checkpoint in",
      ),
      "condensation over training, no checkpoint": (
          [
              "-m",
              "dispersion_jax", "condensation-training",
              "--workdirs",
              str(empty),
              "--corpus",
              "default",
              "--num_texts",
              "2",
              "--max_length",
              "16",
              "--out",
              str(tmp / "out"),
          ],
          "no checkpoint in",
      ),
      "results, no sweep": (
          [
              "-m",
              "dispersion_jax", "results",
              "--sweep_dir",
              str(tmp / "none"),
              "--config",
              os.path.join(REPO, "configs/sweeps/demo.py"),
          ],
          "is not a directory",
      ),
      "sweep, no config": (["-m", "dispersion_jax", "sweep", "--config", str(tmp / "none.py")], "not found"),
      "bench, unknown key": (["-m", "dispersion_jax", "bench", "--config.model.n_heads=4"], "unknown config key"),
  }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "evaluate, no checkpoint",
        "evaluate, truncated checkpoint",
        "train, unbuilt text_dir",
        "data build, no input",
        "condensation, no checkpoint",
        "condensation over training, no checkpoint",
        "results, no sweep",
        "sweep, no config",
        "bench, unknown key",
    ],
)
def test_every_user_error_is_one_line_that_creates_nothing(case, tmp_path, damaged_run):
  (tmp_path / "empty").mkdir()
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.jsonl").write_text('{"text": "a document"}\n')
  argv, expected = _cases(tmp_path, damaged_run)[case]
  before, damaged_before = tree(tmp_path), tree(damaged_run)
  line = one_line_error(run_python(*argv))
  assert expected in line, line
  assert tree(tmp_path) == before and tree(damaged_run) == damaged_before  # not even an empty directory

