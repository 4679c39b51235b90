"""The stages of a build (`build.py` runs them in order and owns the worker pool, passed here as `imap`):
A. tokenize the work units not in the token cache, B. plan each split's stream, C. pack it into shards,
D. register the dataset (TFDS metadata and pack_meta.json) in the temporary directory.
"""

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Iterable

import numpy as np

from dispersion_jax.data import packed, token_files
from dispersion_jax.data.config import DataConfig
from dispersion_jax.data.inputs import SPLITS, TRAIN, VALIDATION, unit_key
from dispersion_jax.errors import DataError

Imap = Callable[[Callable[[dict], Any], list], Iterable]  # the results of fn(task) for each task, in any order


def _bar(total: int, desc: str, unit: str, progress: bool):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# Stage A


def load_stats(token_dir: str, index: int) -> dict | None:
  try:
    with open(token_files.unit_stats_file(token_dir, index)) as fh:
      return json.load(fh)
  except (OSError, json.JSONDecodeError):
    return None


def tokenize_tasks(cfg: DataConfig, ident: packed.Identity, units: list, token_path: str) -> list[dict]:
  """The stage-A tasks (`token_files.tokenize_unit`) of the units not in the token cache yet."""
  os.makedirs(token_path, exist_ok=True)
  info = os.path.join(token_path, "tokens.json")
  if not os.path.exists(info):
    with open(f"{info}.tmp{os.getpid()}", "w") as fh:
      json.dump(
          {
              "token_key": ident.token_key(units),
              "tokenizer": ident.tokenizer,
              "dtype": ident.dtype,
              "units": [unit_key(u) for u in units],
              "input": ident.inputs.identity,
          },
          fh,
      )
    os.replace(f"{info}.tmp{os.getpid()}", info)
  pending = [i for i in range(len(units)) if load_stats(token_path, i) is None]
  return [
      {
          "index": i,
          "unit": units[i],
          "token_dir": token_path,
          "dtype": ident.dtype,
          "tokenizer": ident.tokenizer_spec,
          "text_key": cfg.text_key,
          "grouping": cfg.doc_grouping,
          "threads": False,
      }
      for i in pending
  ]


def tokenize(cfg: DataConfig, ident: packed.Identity, units: list, token_path: str, imap: Imap, progress: bool) -> int:
  tasks = tokenize_tasks(cfg, ident, units, token_path)
  with _bar(sum(t["unit"].nbytes for t in tasks) or len(tasks), "tokenize", "B", progress) as bar:
    bar.unit_scale = True
    tokens = 0
    for stats in imap(token_files.tokenize_unit, tasks):
      tokens += sum(stats["tokens"].values())
      bar.update(units[stats["unit"]].nbytes or 1)
      bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
  return len(tasks)


# ---------------------------------------------------------------------------------------------------------------
# Stage B


@dataclasses.dataclass
class _SplitPlan:
  segments: np.ndarray  # int64[n, 4]: unit, split code, token lo, token hi (in the unit's file)
  starts: np.ndarray  # int64[docs]: stream offset of each document's first token
  documents: int
  tokens: int
  blocks: int
  dropped: int


def plan(ident: packed.Identity, stats: list, token_path: str) -> dict:
  if any(s is None for s in stats):
    raise DataError("stage A left units without token files; re-run the build")
  docs = {s: sum(st["docs"][s] for st in stats) for s in SPLITS}
  pieces: dict = {s: [(u, s, 0, st["docs"][s]) for u, st in enumerate(stats) if st["docs"][s]] for s in SPLITS}
  total = docs[TRAIN] + docs[VALIDATION]
  what = ident.inputs.describe()
  if total == 0:
    raise DataError(f"{what} has no non-empty documents; add documents (check data.text_key and the files)")
  hashed = [u for u, st in enumerate(stats) if st["hashed"]]
  if hashed:  # at least one document in each split, as builder.py decides it
    if total < 2:
      raise DataError(f"{what} has {total} non-empty document; add documents (need >= 2: one is held out)")
    if docs[VALIDATION] == 0:
      _, u, i = min((stats[u]["min_train"][0], u, stats[u]["min_train"][1]) for u in hashed if stats[u]["min_train"])
      pieces = _move(pieces, u, i, TRAIN, VALIDATION)
    elif docs[TRAIN] == 0:
      _, u, i = max(
          (stats[u]["max_validation"][0], u, stats[u]["max_validation"][1])
          for u in hashed
          if stats[u]["max_validation"]
      )
      pieces = _move(pieces, u, i, VALIDATION, TRAIN)
  for split, fix in ((TRAIN, "add training documents"), (VALIDATION, "add documents to the validation files")):
    if not pieces[split]:
      raise DataError(f"{what} has no {split} documents; {fix}")
  plans = {}
  width = ident.seq_len + 1
  for split in SPLITS:
    segs, starts, offset, ndocs = [], [], 0, 0
    for u, file_split, d0, d1 in pieces[split]:
      lens = np.load(token_files.unit_file(token_path, u, file_split, "len"))
      ends = np.cumsum(lens)
      lo, hi = (int(ends[d0 - 1]) if d0 else 0), int(ends[d1 - 1])
      segs.append((u, SPLITS.index(file_split), lo, hi))
      starts.append(offset + (ends[d0:d1] - lens[d0:d1]) - lo)
      offset += hi - lo
      ndocs += d1 - d0
    blocks = offset // width
    if blocks == 0:
      raise DataError(
          f"the {split} split of {what} has {offset:,} tokens, fewer than one block of seq_len+1="
          f"{width}; add documents or use a smaller seq_len"
      )
    plans[split] = _SplitPlan(
        np.asarray(segs, np.int64).reshape(-1, 4),
        np.concatenate(starts).astype(np.int64),
        ndocs,
        offset,
        blocks,
        offset - blocks * width,
    )
  return plans


def _move(pieces: dict, u: int, i: int, src: str, dst: str) -> dict:
  """Moves document i of unit u from split src's stream to split dst's (which is empty)."""
  out = {dst: [(u, src, i, i + 1)], src: []}
  for v, fs, d0, d1 in pieces[src]:
    if v != u:
      out[src].append((v, fs, d0, d1))
      continue
    out[src].extend(p for p in ((v, fs, d0, i), (v, fs, i + 1, d1)) if p[3] > p[2])
  return out


# ---------------------------------------------------------------------------------------------------------------
# Stages C and D


def shard_blocks(ident: packed.Identity) -> int:
  return max(1, packed.SHARD_BYTES // (np.dtype(ident.dtype).itemsize * (ident.seq_len + 1)))


def pack_tasks(ident: packed.Identity, plans: dict, tmp: str, token_path: str, per_shard: int = 0) -> list[dict]:
  """The stage-C tasks (`packed.write_shard`), one per shard of `per_shard` blocks (0 = from packed.SHARD_BYTES):
  the plan's arrays go to `tmp/.plan` (which `register` removes) and the shards into `tmp`."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from tensorflow_datasets.core import naming  # noqa: PLC0415

  per_shard = per_shard or shard_blocks(ident)
  plan_dir = os.path.join(tmp, ".plan")
  os.makedirs(plan_dir, exist_ok=True)
  tasks = []
  for split, plan in plans.items():
    seg_path = os.path.join(plan_dir, f"{split}.segments.npy")
    starts_path = os.path.join(plan_dir, f"{split}.starts.npy")
    np.save(seg_path, plan.segments)
    np.save(starts_path, plan.starts)
    n_shards = -(-plan.blocks // per_shard)
    template = naming.ShardedFileTemplate(
        data_dir=tfds.core.Path(tmp), dataset_name=packed.DATASET_NAME, split=split, filetype_suffix="array_record"
    )
    for k in range(n_shards):
      tasks.append(
          {
              "split": split,
              "shard": k,
              "b0": k * per_shard,
              "b1": min((k + 1) * per_shard, plan.blocks),
              "out": os.fspath(template.sharded_filepath(shard_index=k, num_shards=n_shards)),
              "segments": seg_path,
              "starts": starts_path,
              "token_dir": token_path,
              "seq_len": ident.seq_len,
              "dtype": ident.dtype,
          }
      )
  return tasks


def shard_sizes(ident: packed.Identity, plans: dict, written: Iterable, per_shard: int = 0) -> dict:
  """split -> the byte size of each shard, from the (split, shard, bytes, blocks) results of stage C."""
  per_shard = per_shard or shard_blocks(ident)
  sizes = {split: [0] * (-(-plans[split].blocks // per_shard)) for split in plans}
  for split, shard, nbytes, _ in written:
    sizes[split][shard] = nbytes
  return sizes


def pack(ident: packed.Identity, plans: dict, tmp: str, token_path: str, imap: Imap, progress: bool) -> dict:
  tasks = pack_tasks(ident, plans, tmp, token_path)
  written = []
  with _bar(sum(p.blocks for p in plans.values()), "pack", "block", progress) as bar:
    for result in imap(packed.write_shard, tasks):
      written.append(result)
      bar.update(result[3])
  return shard_sizes(ident, plans, written)


def counts(plans: dict) -> dict:
  """The plans without their arrays (what `register` needs; small enough to pass between processes)."""
  return {s: dataclasses.replace(p, segments=None, starts=None) for s, p in plans.items()}


def register(ident: packed.Identity, plans: dict, sizes: dict, units: list, tmp: str, per_shard: int = 0) -> dict:
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from tensorflow_datasets.core import naming  # noqa: PLC0415

  width, per_shard = ident.seq_len + 1, per_shard or shard_blocks(ident)
  shutil.rmtree(os.path.join(tmp, ".plan"), ignore_errors=True)
  template = naming.ShardedFileTemplate(
      data_dir=tfds.core.Path(tmp), dataset_name=packed.DATASET_NAME, filetype_suffix="array_record"
  )
  split_infos = []
  for split, plan in plans.items():
    lengths = [min(per_shard, plan.blocks - k * per_shard) for k in range(len(sizes[split]))]
    split_infos.append(
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=lengths,
            num_bytes=sum(sizes[split]),
            filename_template=template.replace(split=split),
        )
    )
  tfds.folder_dataset.write_metadata(
      data_dir=tmp,
      features=packed.features(ident.seq_len, ident.dtype),
      split_infos=split_infos,
      filename_template=template,
      version="1.0.0",
      check_data=False,
      disable_shuffling=True,
      description=f"dispersion_jax pre-packed blocks of {width} tokens ({ident.inputs.describe()}, "
      f"tokenizer {ident.tokenizer}).",
  )
  meta = {
      "format": packed.FORMAT_VERSION,
      "fingerprint": ident.fingerprint,
      "seq_len": ident.seq_len,
      "tokenizer": ident.tokenizer,
      "eos_id": ident.eos_id,
      "vocab_size": ident.vocab_size,
      "dtype": ident.dtype,
      "source": ident.inputs.source,
      "units": len(units),
      "token_key": ident.token_key(units),
      "documents": {s: plans[s].documents for s in SPLITS},
      "tokens": {s: plans[s].tokens for s in SPLITS},
      "blocks": {s: plans[s].blocks for s in SPLITS},
      "dropped_tail_tokens": {s: plans[s].dropped for s in SPLITS},
      "ignored_files": list(ident.inputs.ignored),
      "input": ident.inputs.identity,
  }
  with open(os.path.join(tmp, packed.META_FILE), "w") as fh:
    json.dump(meta, fh, indent=1, sort_keys=True)
  return meta
