"""Grain input pipeline: shard -> shuffle documents -> repeat -> append EOS -> pack -> batch.

Batches (numpy, per process, b = batch_size, L = cfg.seq_len):
  input_ids   int32[b, L]  tokens of a packed block of L+1 tokens, block[:-1]
  targets     int32[b, L]  next tokens, block[1:]
  segment_ids int32[b, L]  1, 2, 3... numbers the documents of the row (of the *input* token); a
                           document's EOS belongs to it, so ids change right after each EOS. 0 marks
                           padding (no target), only in the last row/batch of a finite epoch.
  positions   int32[b, L]  0..L-1 (plain GPT positions, not reset per document)
Documents are concatenated GPT-style, each followed by EOS, and split into blocks of L+1
(grain's ConcatThenSplitIterDataset); a document may continue in the next row. The target of
an EOS input (the first token of the next document) is a normal target: mask the loss with
`segment_ids > 0` only; use `segment_ids` equality for same-document pairs (dispersion loss).
The iterator is checkpointable: `get_state()` is a JSON-able dict, `set_state()` resumes exactly.
With Orbax: `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` to save and
`grain.checkpoint.CheckpointRestore(it)` (on a fresh `make_iterator`) to restore. Optional
`cfg.data.worker_count` (default 0) changes the order: keep it fixed within a run.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from dispersion_jax.data import sources

build_dataset = sources.build_dataset


class _AppendEos(grain.transforms.Map):
  def __init__(self, eos_id: int):
    self._eos = np.asarray([eos_id], dtype=np.int32)

  def map(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": np.concatenate([tokens.astype(np.int32), self._eos])}  # int32[n+1]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed block int32[L+1] (+ its segment ids) -> one training row of length L."""
  block, seg = packed["tokens"], packed["tokens_segment_ids"]  # int32[L+1] each
  seg_ids = np.where(seg[1:] > 0, seg[:-1], 0).astype(np.int32)  # 0 where the target is padding.
  return {"input_ids": block[:-1], "targets": block[1:], "segment_ids": seg_ids}


def _add_positions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  b, seq_len = batch["input_ids"].shape
  # Added after batching so padded rows (segment_ids 0) get them too.
  return {**batch, "positions": np.tile(np.arange(seq_len, dtype=np.int32), (b, 1))}


class _JsonSafeIterator(grain.DatasetIterator):
  """Makes `set_state` accept a JSON round trip of `get_state`.

  ConcatThenSplit compares its slices to the tuple (-1, -1); JSON returns lists, which would
  silently truncate documents after a restore. Tuples are restored before delegating.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_slices_to_tuples(state))


def _slices_to_tuples(state: Any) -> Any:
  # Recurses through lists too: mp_prefetch nests one packer state per worker in a list.
  if isinstance(state, list):
    return [_slices_to_tuples(v) for v in state]
  if not isinstance(state, dict):
    return state
  return {
      k: {f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _slices_to_tuples(v)
      for k, v in state.items()
  }


class _JsonSafeDataset(grain.IterDataset):
  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeIterator(self._parent.__iter__())


def make_dataset(
    cfg: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
  """The IterDataset behind `make_iterator` (same arguments)."""
  if batch_size < 1 or cfg.seq_len < 1:
    raise ValueError(f"batch_size={batch_size} and seq_len={cfg.seq_len} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  docs = sources.documents(cfg, split)
  # Shard by documents: each process reads only its own disjoint slice.
  docs = docs[process_index::process_count]
  if len(docs) == 0:
    raise ValueError(
        f"Split {split!r} has fewer documents than process_count={process_count}; use a bigger split."
    )
  if shuffle:
    docs = docs.shuffle(seed=cfg.seed)  # Reshuffled (deterministically) every epoch by repeat.
  docs = docs.repeat(num_epochs).map(_AppendEos(sources.eos_id(cfg)))
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(), length_struct={"tokens": cfg.seq_len + 1}
  )
  # A finite epoch ends in a short batch: pad it (segment_ids 0) to keep shapes static.
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  ds = packed.map(_to_row).batch(batch_size, batch_fn=pad).map(_add_positions)
  worker_count = cfg.data.get("worker_count", 0)
  if worker_count > 0:  # Worker processes: the caller needs a `if __name__ == "__main__"` guard.
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; defaults unless absl.app ran.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _JsonSafeDataset(ds)


def make_iterator(
    cfg: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
  """Checkpointable iterator of per-process batches; `batch_size` = global batch / process_count.

  `num_epochs=None` repeats forever (training); validation: `shuffle=False, num_epochs=1`.
  Shards differ in length, so multi-process eval should run a fixed number of batches.
  """
  ds = make_dataset(
      cfg, split, batch_size=batch_size, process_index=process_index,
      process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
  )
  return iter(ds)


def measure_throughput(cfg: ml_collections.ConfigDict, batch_size: int, num_batches: int) -> float:
  """Tokens/s of the input pipeline alone (train split, after one warm-up batch)."""
  it = make_iterator(cfg, "train", batch_size=batch_size)
  next(it)  # Warm-up: opens files, starts prefetch threads.
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  return batch["input_ids"].size * num_batches / elapsed


def minimal_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A minimal config with every key the data layer reads (for the CLI and tests)."""
  cfg = ml_collections.ConfigDict({
      "seed": 0, "seq_len": 1024, "tokenizer": "gpt2",
      "data": {"source": "default", "text_dir": "", "tfds_name": "", "text_key": "text",
               "data_dir": None, "validation_split": "validation", "worker_count": 0},
  })
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = cfg if not path else cfg[node]
    target[path[-1] if path else node] = value
  return cfg


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Build the dataset and measure input pipeline tokens/s.")
  parser.add_argument("--measure", action="store_true", help="Measure tokens/s after building.")
  parser.add_argument("--source", default="default", choices=sources.SOURCES)
  parser.add_argument("--text_dir", default="")
  parser.add_argument("--tfds_name", default="")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--tokenizer", default="gpt2")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--num_batches", type=int, default=100)
  args = parser.parse_args(argv)
  cfg = minimal_config(**{
      "seq_len": args.seq_len, "tokenizer": args.tokenizer, "data.source": args.source,
      "data.text_dir": args.text_dir, "data.tfds_name": args.tfds_name, "data.data_dir": args.data_dir,
  })
  start = time.perf_counter()
  build_dataset(cfg)
  print(f"build_dataset: {time.perf_counter() - start:.1f} s (cached after the first run)")
  if args.measure:
    tps = measure_throughput(cfg, args.batch_size, args.num_batches)
    print(f"input pipeline: {tps:,.0f} tokens/s (batch {args.batch_size} x seq_len {args.seq_len})")


if __name__ == "__main__":
  main()
