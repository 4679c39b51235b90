"""Step-indexed global batches over a pre-packed dataset: the same on every topology, resumable anywhere.

Train: global row r of step s (counted from this loader's start) is stream element k = start_row + s*B + r;
element k is block perm_e(k mod N) of epoch e = k // N, where perm_e is `grain.experimental.index_shuffle`
seeded by a hash of (seed, e) (a fresh permutation every epoch; seed 1 epoch 0 is not seed 0 epoch 1).
Validation: element k is block k mod N, unshuffled; batch i holds rows [i*B, (i+1)*B).
So a batch is a pure function of (seed, start_row, step), and resuming needs only `rows_consumed`: the same
batches follow on any process count, any mesh, and after a change of the global batch size.

Each process reads only the rows its devices hold (`sharding.addressable_devices_indices_map`, any layout,
also non-contiguous or replicated rows) and assembles global arrays with `jax.make_array_from_callback`.
Threads (`read_threads`, Grain `MapDataset.range(...).map(...)` + thread prefetch) read steps ahead; they never
change the order.

Batches: dicts of int32[B, L] global arrays:
  input_ids    block[:-1] of the block of seq_len + 1 tokens (documents joined by EOS, cut into blocks)
  targets      block[1:]
  segment_ids  1, 2, 3, ... numbers the documents within the row; a document's EOS belongs to it, so ids change
               right after each EOS (never 0: there is no padding)
  positions    0..L-1
"""

import hashlib
from typing import Iterator

import grain
import jax
import numpy as np

from dispersion_jax.data.packed import PackedDataset
from dispersion_jax.errors import CheckpointError, DataError

KEYS = ("input_ids", "targets", "segment_ids", "positions")
STATE_FORMAT = 1
_ROUNDS = 8  # index_shuffle rounds (its header recommends 8)
_FOREVER = 1 << 50  # steps of an "infinite" iterator (grain wants a finite range)


def epoch_seed(seed: int, epoch: int) -> int:
  """The uint32 permutation seed of an epoch: a hash of (seed, epoch)."""
  return int.from_bytes(hashlib.sha256(f"dispersion_jax.data:{seed}:{epoch}".encode()).digest()[:4], "little")


def local_rows(sharding, global_batch: int, seq_len: int | None = None) -> np.ndarray:
  """The rows of the global batch that this process's devices hold (sorted, unique); any layout."""
  shape = (global_batch,) if seq_len is None else (global_batch, seq_len)
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.asarray(sorted(rows), dtype=np.int64)


def collate(tokens: np.ndarray, doc_starts: list[np.ndarray]) -> dict[str, np.ndarray]:
  """Blocks uint[n, L+1] (+ the document starts in each) -> training rows int32[n, L]."""
  n, width = tokens.shape
  seq_len = width - 1
  marks = np.zeros((n, width), np.int32)
  for i, starts in enumerate(doc_starts):
    marks[i, starts] = 1
  t = tokens.astype(np.int32)
  return {
      "input_ids": t[:, :-1],
      "targets": t[:, 1:],
      "segment_ids": (1 + np.cumsum(marks[:, :seq_len], axis=1, dtype=np.int32)),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
  }


class _Batches:
  """Shared by train and validation: step -> this process's rows (numpy) -> global arrays."""

  _split = "train"

  def __init__(
      self, dataset: PackedDataset, *, global_batch: int, sharding, read_threads: int = 4, prefetch: int | None = None
  ):
    if global_batch < 1:
      raise DataError(f"global batch={global_batch} must be >= 1")
    self.dataset, self.global_batch, self.sharding = dataset, global_batch, sharding
    self.seq_len = dataset.seq_len
    self.num_blocks = dataset.num_blocks(self._split)
    if self.num_blocks < 1:
      raise DataError(f"the {self._split} split of {dataset.path} has no blocks; rebuild with more data")
    self.shape = (global_batch, self.seq_len)
    self.rows = local_rows(sharding, global_batch, self.seq_len)  # this process's rows of every global batch
    self._row_pos = np.full(global_batch, -1, np.int64)
    self._row_pos[self.rows] = np.arange(len(self.rows))
    self.read_threads = read_threads
    self.prefetch = max(2, 2 * read_threads) if prefetch is None else prefetch

  def blocks(self, step: int) -> np.ndarray:
    """The block indices of the global batch's rows at `step` (all B rows; a pure function)."""
    return self._blocks(step, np.arange(self.global_batch))

  def _blocks(self, step: int, rows: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows (self.rows, in order) of the global batch at `step`, as numpy int32[len(rows), L]."""
    tokens, starts = self.dataset.read(self._split, self._blocks(step, self.rows))
    return collate(tokens, starts)

  def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays of shape (B, L) with the batch sharding."""

    def make(x: np.ndarray) -> jax.Array:
      def piece(index):
        rows = self._row_pos[np.arange(self.global_batch)[index[0]]]
        return x[rows][:, index[1]]

      return jax.make_array_from_callback(self.shape, self.sharding, piece)

    return {k: make(local[k]) for k in KEYS}

  def __getitem__(self, step: int) -> dict[str, jax.Array]:
    return self.to_global(self.local_batch(int(step)))

  def local_iter(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's numpy rows of steps start, start+1, ..., read ahead by `read_threads` threads."""
    stop = start + _FOREVER if stop is None else stop
    ds = grain.MapDataset.range(start, stop).map(self.local_batch)
    if self.read_threads <= 0:
      return (ds[i] for i in range(len(ds)))
    return iter(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch))
    )

  def iter_from(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global batches of steps start, start+1, ... (stop None = forever)."""
    return (self.to_global(local) for local in self.local_iter(start, stop))

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self.iter_from(0)


class TrainBatches(_Batches):
  """Shuffled training batches; step 0 starts at stream element `start_row` (the checkpoint's rows_consumed)."""

  def __init__(
      self,
      dataset: PackedDataset,
      *,
      global_batch: int,
      seed: int,
      sharding,
      start_row: int = 0,
      read_threads: int = 4,
      prefetch: int | None = None,
  ):
    super().__init__(
        dataset, global_batch=global_batch, sharding=sharding, read_threads=read_threads, prefetch=prefetch
    )
    if start_row < 0:
      raise DataError(f"start_row={start_row} must be >= 0")
    self.seed, self.start_row = seed, start_row
    self._seeds: dict[int, int] = {}

  def _blocks(self, step: int, rows: np.ndarray) -> np.ndarray:
    n, seeds, shuffle = self.num_blocks, self._seeds, grain.experimental.index_shuffle
    out = []
    for k in (self.start_row + step * self.global_batch + rows).tolist():
      epoch, j = divmod(k, n)
      seed = seeds.get(epoch)
      if seed is None:
        seed = seeds.setdefault(epoch, epoch_seed(self.seed, epoch))
      out.append(shuffle(j, max_index=n - 1, seed=seed, rounds=_ROUNDS))
    return np.asarray(out, np.int64)

  def rows_consumed(self, steps_done: int) -> int:
    """The stream position after `steps_done` steps of this loader (what the checkpoint stores)."""
    return self.start_row + steps_done * self.global_batch

  def state(self, rows_consumed: int) -> dict:
    """The JSON-able data state of a checkpoint (the same on every process)."""
    return {
        "format": STATE_FORMAT,
        "rows_consumed": int(rows_consumed),
        "fingerprint": self.dataset.fingerprint,
        "seq_len": self.seq_len,
        "seed": self.seed,
        "global_batch": self.global_batch,
        "num_blocks": self.num_blocks,
        "epoch": int(rows_consumed) // self.num_blocks,
    }


class ValidationBatches(_Batches):
  """Unshuffled batches of a split (validation, or train for a training-loss estimate): batch i = blocks
  [i*B, (i+1)*B) mod N; identical on every topology."""

  _split = "validation"

  def __init__(self, dataset: PackedDataset, *, split: str = "validation", **kw):
    if split not in ("train", "validation"):
      raise DataError(f"split={split!r}: the built datasets have the splits train and validation")
    self._split = split
    super().__init__(dataset, **kw)

  def _blocks(self, step: int, rows: np.ndarray) -> np.ndarray:
    return (step * self.global_batch + rows) % self.num_blocks


def check_resume(state: dict, dataset: PackedDataset) -> int:
  """The rows_consumed to resume from; CheckpointError (one line) if the checkpoint was trained on other data or
  another seq_len. A changed global batch, process count or mesh is fine."""
  try:
    rows, fingerprint, seq_len = int(state["rows_consumed"]), state["fingerprint"], int(state["seq_len"])
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(
        f"the checkpoint's data state {str(state)[:120]} is not one this version wrote "
        "(rows_consumed, fingerprint, seq_len); resume with the code that wrote it"
    ) from None
  if seq_len != dataset.seq_len:
    raise CheckpointError(
        f"the checkpoint was trained with seq_len={seq_len}, this run has seq_len="
        f"{dataset.seq_len}; set --config.seq_len={seq_len} (or start a new workdir / init_from)"
    )
  if fingerprint != dataset.fingerprint:
    raise CheckpointError(
        f"the checkpoint was trained on dataset {fingerprint}, this run's data is "
        f"{dataset.fingerprint} ({dataset.path}); point data.* at the same input, tokenizer and "
        "seq_len, or start a new workdir (init_from to continue from its weights)"
    )
  if rows < 0:
    raise CheckpointError(f"the checkpoint's rows_consumed={rows} is negative; the data state is corrupt")
  return rows


def legacy_rows_consumed(step: int, global_batch: int) -> int:
  """rows_consumed for a checkpoint of the old pipeline (no data state): every step consumed one global batch."""
  return step * global_batch
