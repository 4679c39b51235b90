"""grad_accum=auto: does it pick the largest micro-batch that fits a configured memory limit, train exactly as the
same grad_accum set by hand, and keep its choice across a resume? (Eight local CPU devices; the limit is set with
memory_limit_gb between the compiled sizes of two candidates, which are measured here first.)"""

import json
import os

import pytest

from dispersion_jax import config as config_lib
from dispersion_jax.compile import auto_accum, dry_run
from dispersion_jax.errors import ConfigError
from dispersion_jax.training import train

from conftest import tiny_cfg

pytestmark = pytest.mark.slow  # trains models: deselect with -m 'not slow'


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


def test_auto_picks_what_fits_and_trains_like_the_same_value_by_hand(tmp_path, data_dir, monkeypatch, capsys):
  flags = ("--config.steps=2", "--config.batch_size=32", "--config.grad_accum_headroom=0")
  cfg = tiny_cfg(data_dir, *flags)  # 8 devices, data-parallel 8: candidates 1, 2, 4 micro-batches
  mesh = dry_run.make_mesh(cfg, None)
  assert auto_accum.candidates(32, 8) == [1, 2, 4]
  sizes = {a: auto_accum.measure(cfg, mesh, a) for a in (1, 2)}
  assert sizes[2] < sizes[1]  # half the micro-batch, less memory
  limit_gb = (sizes[1] + sizes[2]) / 2 / 2**30  # accumulation 1 does not fit, 2 does
  auto = tiny_cfg(data_dir, *flags, "--config.grad_accum=auto", f"--config.memory_limit_gb={limit_gb}")
  config_lib.validate(auto, 8)
  workdir = str(tmp_path / "auto")
  chosen = auto_accum.resolve(auto, workdir)
  assert chosen.grad_accum == 2
  err = capsys.readouterr().err
  assert "grad_accum=auto: 2 (micro-batch 16)" in err and "tried 1 (" in err
  record = json.loads((tmp_path / "auto" / auto_accum.RECORD).read_text())
  assert record["grad_accum"] == 2 and record["bytes"] == sizes[2] and [t["grad_accum"] for t in record["tried"]] == [1, 2]

  by_hand = tiny_cfg(data_dir, *flags, "--config.grad_accum=2")
  train.run(chosen, workdir)
  train.run(by_hand, str(tmp_path / "by_hand"))
  assert _losses(workdir) == _losses(str(tmp_path / "by_hand")) and len(_losses(workdir)) == 2

  # A resume reads the record: nothing is compiled again.
  monkeypatch.setattr(auto_accum, "measure", lambda *a: pytest.fail("measured again"))
  assert auto_accum.resolve(auto, workdir).grad_accum == 2
  assert "reused from" in capsys.readouterr().err


def test_nothing_fits_is_one_line_naming_the_fix(tmp_path, data_dir):
  cfg = tiny_cfg(data_dir, "--config.grad_accum=auto", "--config.memory_limit_gb=0.000001")
  with pytest.raises(ConfigError, match=r"^grad_accum=auto: no micro-batch of batch_size=8 fits .* shard more"):
    auto_accum.resolve(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written
