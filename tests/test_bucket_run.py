"""A run whose workdir and dataset are in a bucket (gs://, a GCS emulator on loopback): trained, killed with SIGKILL
between checkpoints and resumed, it has the losses and the metrics history of the same run on a local disk, every
(step, kind) once, with nothing appended to an object; its TensorBoard events are complete in the bucket; and a
workdir it cannot use (s3://, a bucket that does not exist) is one line before anything is compiled or created."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import pytest

from command_helpers import CONFIG, committed_steps, env, one_line_error, without_timing
from conftest import TINY, tiny_cfg
from dispersion_jax.storage import lines, paths
from dispersion_jax.training import metrics, train

pytestmark = pytest.mark.slow

FLAGS = ("--config.steps=12", "--config.checkpoint_every=4", "--config.mesh.data=1")  # one device, as the command has


def test_a_run_in_a_bucket_killed_and_resumed_equals_the_same_run_on_a_local_disk(gcs, tmp_path, data_dir):
  local, bucket_run = str(tmp_path / "local"), gcs.prefix("killed")
  one = jax.devices()[:1]
  assert train.run(tiny_cfg(data_dir, *FLAGS), local, devices=one) == 12

  # The bucket run's dataset is in the bucket too: built there on first use, its shards read in place.
  bucket_data = (f"--config.data.cache_dir={gcs.prefix('data')}",)
  cmd = [sys.executable, "-m", "dispersion_jax", "train", "--config", CONFIG, "--workdir", bucket_run]
  cmd += [*TINY, f"--config.data.data_dir={data_dir}", *FLAGS, *bucket_data]
  proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not committed_steps(bucket_run):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
    time.sleep(0.1)
  assert proc.poll() is None, "the run finished before it could be killed between checkpoints"
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert committed_steps(bucket_run)[-1] < 12

  assert train.run(tiny_cfg(data_dir, *FLAGS, *bucket_data), bucket_run, devices=one) == 12  # resumes
  assert not os.path.exists(tmp_path / "gs:")  # nothing went to a local folder named after the URL
  want, got = without_timing(metrics.read_history(local)), without_timing(metrics.read_history(bucket_run))
  assert sorted(got["train"]) == list(range(1, 13)) and got == want  # exact: same losses, bit for bit
  raw = [json.loads(line) for line in lines.LineLog(metrics.history_location(bucket_run)).read_lines()]
  keys = [(r["step"], r["kind"]) for r in raw]
  assert len(keys) == len(set(keys))  # every (step, kind) once, the resume row included
  assert not paths.path(bucket_run).joinpath("metrics.jsonl").exists()  # no appended object

  # TensorBoard: an event file per session, uploaded whole; a later session wins a step (purge_step), and together
  # they hold every logged step with the history's values.
  loss = {}
  for f in sorted(paths.path(bucket_run).joinpath("tensorboard").iterdir()):
    loss.update({step: v for step, tag, v in _scalars(f.read_bytes()) if tag == "loss"})
  assert loss == pytest.approx({s: r["loss"] for s, r in got["train"].items()}, rel=1e-6)


def _scalars(event_file_bytes: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in a TFRecord event file (length, crc, data, crc framing)."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  out, i = [], 0
  while i < len(event_file_bytes):
    (n,) = struct.unpack("<Q", event_file_bytes[i : i + 8])
    ev = event_pb2.Event.FromString(event_file_bytes[i + 12 : i + 12 + n])
    i += 12 + n + 4
    out += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
  return out


@pytest.mark.parametrize(
    "workdir, says",
    [
        ("s3://some-bucket/run", "s3:// cannot hold this"),
        ("gs://no-such-bucket-dispersion/run", "cannot write to the bucket"),
    ],
)
def test_a_workdir_the_run_cannot_use_is_one_line_before_compiling(gcs, tmp_path, data_dir, workdir, says):
  cmd = [sys.executable, "-m", "dispersion_jax", "train", "--config", CONFIG, "--workdir", workdir]
  r = subprocess.run(
      [*cmd, *TINY, f"--config.data.data_dir={data_dir}"], cwd=tmp_path, env=env(), capture_output=True, text=True,
      timeout=240,
  )
  line = one_line_error(r)
  assert workdir in line and says in line
  assert os.listdir(tmp_path) == []  # nothing created: no local folder named `gs:` or `s3:`
