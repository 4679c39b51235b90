"""Checkpoint cost on a local disk and in a bucket (issue 26; docs/runs-in-a-bucket.md, "Cost of a checkpoint").

  python -m dispersion_jax bench-checkpoint [--n_layer 12] [--bucket gs://B/prefix] [--json PATH]

Prints a table and writes bench_checkpoint.json (or --json); the flags are cli/bench_checkpoint.py's. Measures,
with the run's own Checkpointer (Orbax, TensorStore OCDBT):
- save and restore time of a GPT-2 small-shaped train state: the parameters of GPTConfig.preset("gpt2") (at
  --n_layer blocks: 12 is GPT-2 small's 124.4M parameters) and Adam's two moments, float32 (3 x 4 bytes per
  parameter: 1.49 GB at 12 blocks); a synchronous save (write + commit) and a restore into the same shapes, best of
  --repeats, to a local directory and to the bucket;
- the wall time per step of a loop that saves every --every steps, with async checkpointing on and off. The step
  is synthetic (one elementwise update of every array of the state, an optimizer-like pass over the same 1.49 GB),
  so what differs between the rows is what the save costs the loop: the blocking part (async) or all of it (sync).
The bucket is a GCS emulator (gcp-storage-emulator, the `test` extra; tests/gcs_emulator.py of a checkout) in a
subprocess on loopback, unless --bucket names a real one (credentials as for a run). An emulator in memory on the
same machine measures the client side (serialisation, HTTP, TensorStore/gcsfs) and loopback bandwidth, not a real
bucket's network.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dispersion_jax.benchmarks.bench_data import _machine
from dispersion_jax.errors import ConfigError
from dispersion_jax.models import GPTConfig, init_params
from dispersion_jax.storage import paths
from dispersion_jax.training.checkpoint import Checkpointer

_EMULATOR = """
import sys, time
sys.path.insert(0, {tests!r})
from gcs_emulator import Emulator
e = Emulator().start()
print(e.url, flush=True)
while True:
  time.sleep(3600)
"""


def train_state(n_layer: int) -> dict:
  """GPT-2 small's parameter shapes (n_layer blocks) and two Adam moments, float32, filled with distinct values."""
  cfg = GPTConfig.preset("gpt2", n_layer=n_layer)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)

  def fill(scale):
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(s.shape, np.float32) * scale) for s in leaves])

  return {"params": fill(0.02), "mu": fill(1e-3), "nu": fill(1e-6)}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def start_emulator() -> tuple[subprocess.Popen, dict]:
  tests = pathlib.Path(__file__).resolve().parents[2] / "tests"
  if not (tests / "gcs_emulator.py").exists():
    raise ConfigError("no tests/gcs_emulator.py beside the package: run from a checkout, or give --bucket gs://...")
  proc = subprocess.Popen([sys.executable, "-c", _EMULATOR.format(tests=str(tests))], stdout=subprocess.PIPE, text=True)
  url = proc.stdout.readline().strip()
  env = {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      "GOOGLE_CLOUD_PROJECT": "test",
  }
  return proc, env


def save_restore(where: str, state: dict, repeats: int) -> dict:
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  saves, restores = [], []
  for i in range(repeats):
    workdir = f"{where}/save{i}"
    ckpt = Checkpointer(workdir, max_to_keep=None, async_save=False)
    t0 = time.perf_counter()
    ckpt.save(1, state, None, {"bench": True})
    ckpt.close()
    saves.append(time.perf_counter() - t0)
    reader = Checkpointer.reader(workdir)
    t0 = time.perf_counter()
    restored = reader.restore(1, abstract)
    jax.block_until_ready(restored)
    restores.append(time.perf_counter() - t0)
    reader.close()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
    del restored
    paths.path(workdir).rmtree()  # the emulator holds its objects in memory
  return {"save_s": min(saves), "restore_s": min(restores), "save_all_s": saves, "restore_all_s": restores}


def loop(where: str, state: dict, *, async_save: bool, steps: int, every: int) -> dict:
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0.999 + 1e-4, s))
  state = jax.block_until_ready(step(state))  # compiled before timing
  ckpt = Checkpointer(where, max_to_keep=2, async_save=async_save)
  t0 = time.perf_counter()
  for i in range(1, steps + 1):
    state = step(state)
    if i % every == 0:
      ckpt.save(i, state, None, {"bench": True})
    jax.block_until_ready(state)
  loop_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  ckpt.close()  # the last async commit, not part of the steps
  final_wait_s = time.perf_counter() - t1
  if paths.exists(where):
    paths.path(where).rmtree()
  return {"ms_per_step": 1e3 * loop_s / steps, "final_wait_s": final_wait_s}


def run(n_layer: int, bucket: str | None, repeats: int, steps: int, every: int, json_path: str) -> dict:
  state = train_state(n_layer)
  size = nbytes(state)
  emulator, local = None, tempfile.mkdtemp(prefix="bench_ckpt_")
  if bucket is None:
    emulator, env = start_emulator()
    os.environ.update(env)
    bucket = f"gs://dispersion-test/bench-{os.getpid()}"
  try:
    stores = {"local disk": local, "bucket": bucket}
    io = {name: save_restore(f"{where}/io", state, repeats) for name, where in stores.items()}
    steps_rows = []
    for name, where in stores.items():
      for async_save in (False, True):
        r = loop(f"{where}/loop-{async_save}", state, async_save=async_save, steps=steps, every=every)
        steps_rows.append({"store": name, "async": async_save, **r})
    no_save = loop(f"{local}/nosave", state, async_save=False, steps=steps, every=steps + 1)
  finally:
    shutil.rmtree(local, ignore_errors=True)
    if emulator is not None:
      emulator.kill()
      emulator.wait()
  results = {
      "machine": _machine(),
      "state": {
          "n_layer": n_layer, "parameters": size // 12, "bytes": size, "dtype": "float32 params + 2 Adam moments"
      },
      "bucket": "GCS emulator (gcp-storage-emulator, in memory, loopback subprocess)" if emulator else bucket,
      "save_restore": io,
      "loop": {"steps": steps, "save_every": every, "no_checkpoint_ms_per_step": no_save["ms_per_step"],
               "rows": steps_rows},
  }
  m = results["machine"]
  print(f"machine: {m['cpu_model']} x {m['nproc']} (load {', '.join(f'{x:.1f}' for x in m['load_average'])})")
  print(f"state: GPT-2 small shapes, {n_layer} blocks, {size // 12 / 1e6:.1f}M parameters + Adam, {size / 1e9:.2f} GB")
  print(f"bucket: {results['bucket']}\n")
  print(f"{'store':<12}{'save s':>9}{'GB/s':>7}{'restore s':>11}{'GB/s':>7}")
  for name, r in io.items():
    print(f"{name:<12}{r['save_s']:>9.2f}{size / 1e9 / r['save_s']:>7.2f}{r['restore_s']:>11.2f}"
          f"{size / 1e9 / r['restore_s']:>7.2f}")
  print(f"\nloop: {steps} synthetic steps, a checkpoint every {every}; without checkpoints "
        f"{no_save['ms_per_step']:.0f} ms/step")
  print(f"{'store':<12}{'async':<7}{'ms/step':>9}{'final wait s':>14}")
  for r in steps_rows:
    print(f"{r['store']:<12}{str(r['async']):<7}{r['ms_per_step']:>9.0f}{r['final_wait_s']:>14.2f}")
  with open(json_path, "w") as fh:
    json.dump(results, fh, indent=1)
  print(f"\nwrote {json_path}")
  return results
