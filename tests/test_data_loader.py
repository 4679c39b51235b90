"""Step-indexed batches: row semantics, per-epoch shuffles, topology-free global batches, resume, state checks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import loader, packed
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import CheckpointError

from conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
EOS = 50256
L = 16
B = 8
WORDS = "alpha beta gamma delta river stone light garden silver morning quiet north".split()


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> packed.PackedDataset:
  root = tmp_path_factory.mktemp("texts")
  rng = np.random.default_rng(0)
  with open(root / "docs.jsonl", "w") as fh:
    for i in range(120):
      fh.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))}) + "\n")
  cfg = DataConfig(source="text_dir", text_dir=str(root), cache_dir=str(root / "cache"))
  report = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  return packed.open_path(report.path)


def _mesh(devices, order=None, shape=None, names=("data",)) -> Mesh:
  devs = np.asarray(devices, dtype=object)
  if order is not None:
    devs = devs[list(order)]
  return Mesh(devs.reshape(shape or (len(devs),)), names)


def _sharding(mesh, spec=P("data")) -> NamedSharding:
  return NamedSharding(mesh, spec)


@pytest.fixture(scope="module")
def one_device():
  return _sharding(_mesh(jax.devices()[:1]))


def _np(batch) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}


def test_rows_are_shifted_blocks_with_segment_ids_and_positions(ds, one_device):
  val = loader.ValidationBatches(ds, global_batch=4, sharding=one_device)
  n = ds.num_blocks("validation")
  tokens, _ = ds.read("validation", range(n))
  for i in range(3):
    b = _np(val[i])
    assert set(b) == {"input_ids", "targets", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (4, L) for v in b.values())
    blocks = tokens[np.arange(i * 4, i * 4 + 4) % n]  # unshuffled, wrapping at the end
    np.testing.assert_array_equal(b["input_ids"], blocks[:, :-1])
    np.testing.assert_array_equal(b["targets"], blocks[:, 1:])
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(L), (4, L)))
  assert ds._records("validation") is not None  # the fast path: raw records, parsed here
  some = [n - 1, 0, n // 2]
  via_tfds = ds.source("validation").__getitems__(some)
  fast_tokens, fast_starts = ds.read("validation", some)
  for r, t, s in zip(via_tfds, fast_tokens, fast_starts):
    np.testing.assert_array_equal(r["tokens"], t)
    np.testing.assert_array_equal(r["doc_starts"], s)
  train = loader.TrainBatches(ds, global_batch=B, seed=0, sharding=one_device)
  changes = 0
  for s in range(6):
    b = _np(train[s])
    for ids, seg in zip(b["input_ids"], b["segment_ids"]):
      assert seg[0] == 1
      step = np.diff(seg)
      np.testing.assert_array_equal(step != 0, ids[:-1] == EOS)  # a new segment right after each EOS
      assert set(step.tolist()) <= {0, 1}
      changes += int(step.sum())
  assert changes > 10


def test_train_epoch_visits_every_block_once_and_epochs_differ(ds, one_device):
  n = ds.num_blocks("train")
  t = loader.TrainBatches(ds, global_batch=B, seed=3, sharding=one_device)
  stream = np.concatenate([t.blocks(s) for s in range(-(-3 * n // B))])
  first, second, third = stream[:n], stream[n : 2 * n], stream[2 * n : 3 * n]
  for epoch in (first, second, third):
    assert sorted(epoch.tolist()) == list(range(n))
  assert not np.array_equal(first, second) and not np.array_equal(second, third)
  assert not np.array_equal(first, np.arange(n))
  other = loader.TrainBatches(ds, global_batch=B, seed=4, sharding=one_device)
  assert not np.array_equal(other.blocks(0), t.blocks(0))
  again = loader.TrainBatches(ds, global_batch=B, seed=3, sharding=one_device)
  np.testing.assert_array_equal(again.blocks(7), t.blocks(7))
  assert loader.epoch_seed(1, 0) != loader.epoch_seed(0, 1)  # not seed + epoch


def test_threads_and_indexing_give_the_same_batches(ds, one_device):
  t = loader.TrainBatches(ds, global_batch=B, seed=0, sharding=one_device, read_threads=3)
  got = [_np(b) for b, _ in zip(t.iter_from(5), range(6))]
  plain = loader.TrainBatches(ds, global_batch=B, seed=0, sharding=one_device, read_threads=0)
  for s, b in enumerate(got, 5):
    want = _np(plain[s])
    for k in want:
      np.testing.assert_array_equal(b[k], want[k])
  tokens, _ = ds.read("train", t.blocks(5))
  np.testing.assert_array_equal(got[0]["input_ids"], tokens[:, :-1])


def test_global_batches_do_not_depend_on_the_mesh(ds):
  devices = jax.devices()
  assert len(devices) >= 8
  n = ds.num_blocks("train")
  boundary = n // B  # the epoch ends inside this step
  layouts = [
      _sharding(_mesh(devices[:1])),
      _sharding(_mesh(devices[:8])),
      _sharding(_mesh(devices[:8], order=[3, 0, 7, 1, 6, 2, 5, 4])),  # rows on devices out of order
      _sharding(_mesh(devices[:8], shape=(2, 4), names=("data", "fsdp")), P(("data", "fsdp"))),
      _sharding(_mesh(devices[:4], shape=(2, 2), names=("data", "seq")), P("data", "seq")),  # columns split too
      _sharding(_mesh(devices[:4], shape=(2, 2), names=("data", "rep")), P("data")),  # replicated rows
  ]
  ref = None
  for sh in layouts:
    t = loader.TrainBatches(ds, global_batch=B, seed=1, sharding=sh, read_threads=2)
    got = [_np(b) for b, _ in zip(t.iter_from(boundary - 1), range(3))]
    if ref is None:
      ref = got
      continue
    for a, b in zip(ref, got):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  assert len({tuple(np.asarray(r["input_ids"][0])) for r in ref}) == 3


class _Rows:
  """A stand-in for a batch sharding of another process: its devices hold these row ranges."""

  def __init__(self, blocks):
    self.blocks = blocks

  def addressable_devices_indices_map(self, shape):
    return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.blocks)}


def test_a_process_reads_only_its_rows_even_when_not_contiguous(ds, one_device):
  full = loader.TrainBatches(ds, global_batch=B, seed=2, sharding=one_device)
  part = loader.TrainBatches(ds, global_batch=B, seed=2, sharding=_Rows([(6, 8), (0, 2), (1, 2)]))
  np.testing.assert_array_equal(part.rows, [0, 1, 6, 7])
  reads = []
  real = ds.read
  ds.read = lambda split, blocks: reads.append(list(blocks)) or real(split, blocks)
  try:
    local = part.local_batch(11)
  finally:
    del ds.read
  assert reads == [full.blocks(11)[[0, 1, 6, 7]].tolist()]  # no other rows are read
  want = full.local_batch(11)
  for k in want:
    np.testing.assert_array_equal(local[k], want[k][[0, 1, 6, 7]])


def test_a_new_global_batch_continues_from_the_right_row(ds, one_device):
  n = ds.num_blocks("train")
  ref = loader.TrainBatches(ds, global_batch=4, seed=5, sharding=one_device)
  stream = np.concatenate([ref.blocks(s) for s in range(-(-2 * n // 4))])
  first = loader.TrainBatches(ds, global_batch=B, seed=5, sharding=one_device)
  steps = n // B - 1  # stop just before the epoch boundary
  done = first.rows_consumed(steps)
  state = json.loads(json.dumps(first.state(done)))  # as stored in the checkpoint
  resumed = loader.TrainBatches(
      ds, global_batch=12, seed=5, sharding=one_device, start_row=loader.check_resume(state, ds)
  )
  got = np.concatenate([resumed.blocks(s) for s in range(4)])
  np.testing.assert_array_equal(got, stream[done : done + 48])  # crosses into epoch 1
  b = _np(resumed[1])
  tokens, _ = ds.read("train", stream[done + 12 : done + 24])
  np.testing.assert_array_equal(b["targets"], tokens[:, 1:])
  legacy = loader.legacy_rows_consumed(step=7, global_batch=B)
  np.testing.assert_array_equal(
      loader.TrainBatches(ds, global_batch=B, seed=5, sharding=one_device, start_row=legacy).blocks(0), first.blocks(7)
  )


def test_state_and_resume_checks(ds, one_device):
  t = loader.TrainBatches(ds, global_batch=B, seed=0, sharding=one_device, start_row=24)
  state = t.state(t.rows_consumed(3))
  assert state == {
      "format": 1,
      "rows_consumed": 48,
      "fingerprint": ds.fingerprint,
      "seq_len": L,
      "seed": 0,
      "global_batch": B,
      "num_blocks": ds.num_blocks("train"),
      "epoch": 48 // ds.num_blocks("train"),
  }
  assert json.loads(json.dumps(state)) == state
  assert loader.check_resume(state, ds) == 48
  for bad, match in [
      ({**state, "fingerprint": "f" * 16}, "trained on dataset ffffffffffffffff"),
      ({**state, "seq_len": 32}, r"seq_len=32, this run has seq_len=16; set --config.seq_len=32"),
      ({"step": 3}, "not one this version wrote"),
  ]:
    with pytest.raises(CheckpointError, match=match) as e:
      loader.check_resume(bad, ds)
    assert "\n" not in str(e.value)


# --- real processes on loopback -----------------------------------------------------------------------------

# Each process reads its rows of 3 global batches (across an epoch boundary) twice: from the start with batch 8, and
# resumed at row R with batch 4. It writes the addressable shards of every array to argv[5].
_WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, n, i, path, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
INIT_S = int(float(sys.argv[6]))  # a hang guard: every process must have joined
if n > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=i, initialization_timeout=INIT_S)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dispersion_jax.data import loader, packed
ds = packed.open_path(path)
devices = sorted(jax.devices(), key=lambda d: d.id)
order = [0, 2, 1, 3] if n == 2 else [3, 1, 0, 2] if n == 4 else [0, 1, 2, 3]   # non-contiguous rows per process
sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object)[order], ("data",)), P("data"))
first = ds.num_blocks("train") // 8 - 1
saved = {}
for name, batch, start_row, start in (("b8", 8, 0, first), ("b4", 4, 8 * first + 4, 0), ("val", 8, None, 1)):
  if start_row is None:
    t = loader.ValidationBatches(ds, global_batch=batch, sharding=sharding)
  else:
    t = loader.TrainBatches(ds, global_batch=batch, seed=7, sharding=sharding, start_row=start_row, read_threads=2)
  for s, b in zip(range(3), t.iter_from(start)):
    for k, v in b.items():
      for sh in v.addressable_shards:
        saved[f"{name}/{s}/{k}/{sh.index[0].start or 0}"] = np.asarray(sh.data)
np.savez(out, rows=loader.local_rows(sharding, 8, 16), **saved)
print("ok", jax.process_index(), jax.process_count(), len(jax.local_devices()))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(ROOT),
      XLA_FLAGS=" ".join([*kept, f"--xla_force_host_platform_device_count={devices}"]),
  )
  return env


def _run_processes(n: int, path: str, tmp: Path) -> list[SimpleNamespace]:
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _WORKER, str(port), str(n), str(i), path, str(tmp / f"{n}_{i}.npz"), str(scaled(60))],
          cwd=ROOT,
          env=_env(4 // n),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(n)
  ]
  try:
    outs = [p.communicate(timeout=scaled(120))[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return [SimpleNamespace(out=o, data=dict(np.load(tmp / f"{n}_{i}.npz"))) for i, o in enumerate(outs)]


def _assemble(results, name: str, batch: int) -> dict:
  full = {}
  for r in results:
    for key, value in r.data.items():
      if not key.startswith(name + "/"):
        continue
      _, s, k, row = key.split("/")
      arr = full.setdefault((int(s), k), np.full((batch, L), -1, np.int64))
      arr[int(row) : int(row) + len(value)] = value
  assert all((a >= 0).all() for a in full.values())  # every row came from some process
  return full


@pytest.mark.multiprocess
@pytest.mark.slow
def test_global_batches_are_identical_on_1_2_and_4_processes(ds, tmp_path):
  runs = {n: _run_processes(n, ds.path, tmp_path) for n in (1, 2, 4)}
  assert [r.data["rows"].tolist() for r in runs[2]] == [[0, 1, 4, 5], [2, 3, 6, 7]]  # not contiguous
  assert "ok 3 4 1" in runs[4][3].out
  first = ds.num_blocks("train") // 8 - 1
  one = loader.TrainBatches(ds, global_batch=8, seed=7, sharding=_sharding(_mesh(jax.devices()[:1])))
  for name, batch in (("b8", 8), ("b4", 4), ("val", 8)):
    ref = _assemble(runs[1], name, batch)
    for n in (2, 4):
      got = _assemble(runs[n], name, batch)
      assert got.keys() == ref.keys()
      for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{n} processes, {name} {key}")
  for s in range(3):  # and equal to this process's loader
    want = _np(one[first + s])
    for k in want:
      np.testing.assert_array_equal(_assemble(runs[4], "b8", 8)[(s, k)], want[k])
  # resumed at row 8*first + 4 with batch 4: continues the batch-8 stream exactly (half a step later)
  b8, b4 = _assemble(runs[1], "b8", 8), _assemble(runs[1], "b4", 4)
  stream8 = np.concatenate([b8[(s, "input_ids")] for s in range(3)])
  stream4 = np.concatenate([b4[(s, "input_ids")] for s in range(3)])
  np.testing.assert_array_equal(stream4, stream8[4:16])
  val_tokens, _ = ds.read("validation", np.arange(8, 32) % ds.num_blocks("validation"))  # batches 1, 2, 3
  val = np.concatenate([_assemble(runs[2], "val", 8)[(s, "targets")] for s in range(3)])
  np.testing.assert_array_equal(val, val_tokens[:, 1:])
