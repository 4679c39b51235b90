"""A bucket that fails during a checkpoint (a GCS emulator on loopback whose handler refuses the writes of one
step's objects): a save the storage never completes ends the run within `checkpoint_timeout_s` with one line and
exit 75, never a hang; a save killed mid-write (SIGKILL while the bucket holds part of the step) leaves the
previous checkpoint as the resume point; and the run resumed after both equals an uninterrupted one bit for bit.
A restore the storage does not serve ends within the bound too."""

import os
import subprocess
import sys
import threading
import time
import urllib.parse

import jax
import jax.numpy as jnp
import pytest

from command_helpers import CONFIG, INTERRUPTED, NOISE, committed_steps, env, without_timing
from conftest import TINY, scaled, tiny_cfg
from dispersion_jax.errors import StorageUnavailableError
from dispersion_jax.storage import paths
from dispersion_jax.training import metrics, train
from dispersion_jax.training.checkpoint import Checkpointer
from gcs_emulator import writes_fail  # noqa: I001 - the tests' own helper module

BOUND_S = 10  # --config.checkpoint_timeout_s of these runs
# The bound is the feature under test, so it is not scaled: from the first refused write to the process's exit the
# run may also finish its current step, reach the next save, print and exit; 20 s covers that on a loaded 2-core box.
MARGIN_S = 20
FLAGS = ("--config.steps=4", "--config.checkpoint_every=1", "--config.mesh.data=1",
         f"--config.checkpoint_timeout_s={BOUND_S}")


class RefuseStep:
  """An emulator fault: the writes of objects under `RUN/checkpoints/STEP/` pass `passes` times (the step is then
  partly in the bucket), and every later one answers 503, forever. `refused` is set at the first refusal."""

  def __init__(self, run: str, step: int, passes: int):
    self.prefix = f"{run.split('/', 3)[3]}/checkpoints/{step}/"  # gs://BUCKET/NAME -> NAME/checkpoints/STEP/
    self.passes, self.refused, self.at = passes, threading.Event(), None
    self._lock = threading.Lock()

  def __call__(self, method: str, path: str):
    if method not in ("POST", "PUT", "PATCH", "DELETE") or self.prefix not in urllib.parse.unquote(path):
      return None
    with self._lock:
      if self.passes > 0:
        self.passes -= 1
        return None
      if not self.refused.is_set():
        self.at = time.monotonic()
        self.refused.set()
    return 503


def objects_of_step(run: str, step: int) -> list[str]:
  """The objects under checkpoint `step` in the bucket, listed afresh (gcsfs caches listings in this process)."""
  import gcsfs  # noqa: PLC0415 - the test extra

  fs = gcsfs.GCSFileSystem()
  fs.invalidate_cache()
  root = paths.join(run, "checkpoints", str(step)).removeprefix("gs://")
  return [name.removeprefix(root + "/") for name in fs.find(root)]


@pytest.mark.slow
def test_an_outage_during_a_save_ends_the_run_in_one_line_and_a_kill_mid_save_keeps_the_last_checkpoint(
    gcs, tmp_path, data_dir
):
  one = jax.devices()[:1]
  local, run = str(tmp_path / "local"), gcs.prefix("outage")
  assert train.run(tiny_cfg(data_dir, *FLAGS), local, devices=one) == 4  # the uninterrupted run
  cmd = [sys.executable, "-m", "dispersion_jax", "train", "--config", CONFIG, "--workdir", run]
  cmd += [*TINY, f"--config.data.data_dir={data_dir}", *FLAGS]

  # 1. The bucket stops taking step 2's objects after three of them: the run ends within the bound, in one line.
  outage = RefuseStep(run, 2, passes=3)
  with gcs.failing(outage):
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=scaled(300))  # a hang guard: the bound below is what is tested
    ended = time.monotonic()
  assert outage.refused.is_set(), err[-3000:]
  assert ended - outage.at < BOUND_S + MARGIN_S, ended - outage.at
  assert proc.returncode == INTERRUPTED, err[-3000:]
  error = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and not NOISE.search(err), err[-3000:]
  assert f"within {BOUND_S} s" in error[0] and "resumes from step 1" in error[0], error[0]
  assert "checkpoint_timeout_s" in error[0] and err.rstrip().endswith(error[0]), err[-3000:]  # nothing after it
  assert committed_steps(run) == [1] and objects_of_step(run, 2)  # step 2 is partly there, and not a checkpoint

  # 2. The storage is back: the run resumes from step 1; its save of step 3 is killed mid-write (SIGKILL once the
  #    bucket has taken some of step 3's arrays and refuses the rest).
  partial = RefuseStep(run, 3, passes=8)
  with gcs.failing(partial):
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      assert partial.refused.wait(scaled(300)), "the save of step 3 never reached the bucket"
    finally:
      proc.kill()
      out, err = proc.communicate(timeout=scaled(60))
  assert "resuming from step 1" in out, out[-3000:]
  written = objects_of_step(run, 3)
  assert committed_steps(run) == [1, 2] and any(name.startswith("state/") for name in written), written

  # 3. Resumed again: from step 2, never from the partial step 3; every loss equals the uninterrupted run's.
  assert train.run(tiny_cfg(data_dir, *FLAGS), run, devices=one) == 4
  assert committed_steps(run)[-1] == 4
  want, got = without_timing(metrics.read_history(local)), without_timing(metrics.read_history(run))
  assert sorted(got["train"]) == [1, 2, 3, 4] and got == want
  assert not os.path.exists(tmp_path / "gs:")


def test_a_restore_the_storage_does_not_serve_ends_within_the_bound(gcs):
  run = gcs.prefix("restore")
  state = {"w": jnp.arange(1024.0)}
  writer = Checkpointer(run, async_save=False)
  writer.save(1, state, None, {"x": 1})
  writer.close()

  def arrays_unavailable(method, path):  # the array chunks of step 1 answer 503 forever; metadata still reads
    name = urllib.parse.unquote(path)
    return 503 if method == "GET" and "/checkpoints/1/state/" in name and "/d/" in name else None

  reader = Checkpointer(run, writer=False, timeout_s=3)
  with gcs.failing(arrays_unavailable):
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError) as e:
      reader.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    took = time.monotonic() - start
  assert took < 3 + 5, took  # the bound (not scaled: it is the feature) + 5 s for the metadata reads before it
  assert "checkpoint 1 did not finish within 3 s" in str(e.value) and "\n" not in str(e.value)


def test_a_bound_that_is_not_positive_is_one_line():
  from dispersion_jax import config as config_lib  # noqa: PLC0415
  from dispersion_jax.errors import ConfigError  # noqa: PLC0415

  cfg = config_lib.default_config()
  cfg.checkpoint_timeout_s = 0.0
  with pytest.raises(ConfigError, match=r"^config: checkpoint_timeout_s=0.0 must be > 0 \(seconds\)$"):
    config_lib.loop_config(cfg)


def test_a_tensorboard_upload_the_bucket_refuses_at_a_checkpoint_is_one_line(gcs):
  from dispersion_jax.training.metrics import MetricsLogger  # noqa: PLC0415

  logger = MetricsLogger(gcs.prefix("tensorboard"), total_steps=2, start_step=0, progress=False)
  logger.log(1, {"loss": 1.0, "ce": 1.0})
  try:
    with gcs.failing(writes_fail(403)), pytest.raises(StorageUnavailableError) as e:  # 403: not retried, no wait
      logger.flush()
  finally:
    logger.close(upload=False)
  assert str(e.value).startswith("uploading the TensorBoard events to gs://") and "\n" not in str(e.value)
