"""One path type for a run: local paths behave as pathlib, gs:// joins as a URL, and a scheme a run cannot honour
is a one-line ConfigError naming the setting."""

import pathlib

import pytest

from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import paths


@pytest.mark.parametrize(
    "base, parts, want",
    [
        ("runs/demo", ("checkpoints",), "runs/demo/checkpoints"),
        ("/abs/run/", ("tensorboard", "x"), "/abs/run/tensorboard/x"),
        ("gs://bucket/run", ("checkpoints", "4"), "gs://bucket/run/checkpoints/4"),
        ("gs://bucket/run/", ("metrics.jsonl",), "gs://bucket/run/metrics.jsonl"),
    ],
)
def test_join_is_the_same_for_local_and_bucket_paths(base, parts, want):
  assert paths.join(base, *parts) == want


def test_local_paths_keep_pathlib_behaviour(tmp_path):
  p = paths.path(tmp_path / "run")
  assert str(p) == str(tmp_path / "run") and not paths.is_remote(p)
  (p / "a.txt").parent.mkdir(parents=True)
  (p / "a.txt").write_text("x")
  assert pathlib.Path(tmp_path / "run" / "a.txt").read_text() == "x"


def test_gs_is_remote_and_kept_as_a_url():
  assert paths.is_remote("gs://bucket/run") and str(paths.path("gs://bucket/run")) == "gs://bucket/run"


@pytest.mark.parametrize("bad, says", [("s3://b/run", "use gs:// or mount the bucket"), ("hdfs://h/run", "unknown scheme")])
def test_a_scheme_a_run_cannot_honour_is_one_line_naming_the_setting(bad, says):
  with pytest.raises(ConfigError) as e:
    paths.path(bad, what="--workdir")
  msg = str(e.value)
  assert msg.startswith(f"--workdir={bad}: ") and says in msg and "\n" not in msg


def test_s3_is_accepted_where_the_caller_can_honour_it():
  assert str(paths.path("s3://b/export", s3=True)) == "s3://b/export"
