"""What storage/ does in a bucket (a GCS emulator on loopback): a line history is never appended to an object and
survives a kill at any moment (chunk objects, generations); publishing a directory is all-or-nothing (a marker
object written last); a missing bucket is one line; a short burst of 503s on writes is retried through."""

import os

import pytest

from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import bucket, lines, paths, transfer
from gcs_emulator import writes_fail  # noqa: I001 - the tests' own helper module


def test_each_appended_line_is_stored_when_append_returns_and_chunks_roll_over(gcs):
  where = lines.location(gcs.prefix(), "metrics.jsonl")
  log = lines.LineLog(where)
  log.open_for_append()
  for i in range(lines.CHUNK_LINES + 3):
    log.append(f"{i}\n")
    # a reader that starts now (a crash right after append returned) sees every line so far, in order
    assert lines.LineLog(where).read_lines() == [f"{j}\n" for j in range(i + 1)]
  names = sorted(p.name for p in paths.path(where).iterdir())
  assert names == ["g000000-000000.jsonl", "g000000-000001.jsonl"]  # rolled, never appended to


def test_a_rewrite_is_atomic_a_kill_before_the_old_generation_is_deleted_reads_the_new_one(gcs):
  where = lines.location(gcs.prefix(), "metrics.jsonl")
  log = lines.LineLog(where)
  log.open_for_append()
  for i in range(5):
    log.append(f"{i}\n")
  paths.path(where).joinpath("g000001-000000.jsonl").write_text("0\n1\n")  # replace() killed after its one write
  assert lines.LineLog(where).read_lines() == ["0\n", "1\n"]
  log = lines.LineLog(where)
  log.replace(["0\n"])
  log.append("9\n")
  assert lines.LineLog(where).read_lines() == ["0\n", "9\n"]
  assert sorted(p.name for p in paths.path(where).iterdir()) == ["g000002-000000.jsonl", "g000002-000001.jsonl"]


def test_local_histories_stay_one_appended_file(tmp_path):
  where = lines.location(tmp_path, "metrics.jsonl")
  assert where == str(tmp_path / "metrics.jsonl")
  log = lines.LineLog(where)
  log.open_for_append()
  log.append("a\n")
  assert open(where).read() == "a\n"
  log.replace(["b\n"])
  assert open(where).read() == "b\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_publish_is_all_or_nothing_and_replaces_an_unfinished_upload(gcs, tmp_path):
  dest = gcs.prefix("dataset")
  paths.path(dest).joinpath("stale-shard").write_text("left by a killed upload")  # no marker: unfinished
  assert not transfer.is_published(dest)
  src = tmp_path / "tmp-build"
  (src / "sub").mkdir(parents=True)
  (src / "a.txt").write_text("a")
  (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
  transfer.publish(src, dest)
  assert transfer.is_published(dest) and not src.exists()
  root = paths.path(dest)
  assert not root.joinpath("stale-shard").exists()
  assert root.joinpath("a.txt").read_text() == "a" and root.joinpath("sub", "b.bin").read_bytes() == b"\x00\x01"
  with transfer.local_dir(dest) as local:  # and back, without the marker
    assert sorted(os.listdir(local)) == ["a.txt", "sub"]


def test_publish_to_a_local_path_is_a_rename(tmp_path):
  (tmp_path / "tmp").mkdir()
  (tmp_path / "tmp" / "x").write_text("x")
  transfer.publish(tmp_path / "tmp", tmp_path / "done")
  assert transfer.is_published(tmp_path / "done") and (tmp_path / "done" / "x").read_text() == "x"


def test_a_missing_bucket_is_one_line_and_a_writable_one_passes(gcs):
  bucket.check_writable(gcs.prefix())
  with pytest.raises(ConfigError) as e:
    bucket.check_writable("gs://no-such-bucket-dispersion/run")
  msg = str(e.value)
  assert msg.startswith("--workdir=gs://no-such-bucket-dispersion/run: cannot write to the bucket") and "\n" not in msg


def test_a_short_burst_of_503s_on_writes_is_retried_through(gcs):
  where = lines.location(gcs.prefix(), "metrics.jsonl")
  log = lines.LineLog(where)
  log.open_for_append()
  left = [3]

  def burst(method, path):
    if method in ("POST", "PUT") and left[0] > 0:
      left[0] -= 1
      return 503
    return None

  with gcs.failing(burst):
    log.append("kept\n")
  assert left[0] == 0 and lines.LineLog(where).read_lines() == ["kept\n"]


def test_a_history_write_the_bucket_still_refuses_after_retries_is_one_line(gcs):
  from dispersion_jax.errors import StorageUnavailableError  # noqa: PLC0415

  where = lines.location(gcs.prefix(), "metrics.jsonl")
  log = lines.LineLog(where)
  log.open_for_append()
  with gcs.failing(writes_fail(403)), pytest.raises(StorageUnavailableError) as e:  # 403: not retried, so no wait
    log.append("lost\n")
  msg = str(e.value)
  assert msg.startswith(f"writing the history {where} failed (") and "\n" not in msg and "re-run" in msg
