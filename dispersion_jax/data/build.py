"""Building the pre-packed dataset, in parallel, deterministically, all or nothing.

  report = build(data_cfg, tokenizer="gpt2", seq_len=1024, workers=16)
  ds = packed.open_packed(data_cfg, tokenizer="gpt2", seq_len=1024)      # or open_or_build_default(...)

Stages (`inputs.py` defines the units, `packed.py` the format):
  A. tokenize: worker processes (spawn: JAX may be imported, and threaded, in the parent) turn each work unit
     into token files per split (documents with EOS appended, and their lengths) under the token cache dir, which
     has no seq_len in its key; a finished unit is kept, so a re-run after a kill tokenizes only the rest and a new
     seq_len re-packs without tokenizing at all.
  B. plan (this process): each split's stream = its documents in unit order; N = tokens // (seq_len + 1) blocks.
     Without a validation split in the input, documents with `corpus.doc_hash(id) < VALIDATION_FRACTION` are held
     out, and at least one document is kept in each split (as builder.py does).
  C. pack: workers write fixed block ranges (shards) of each stream into ArrayRecord files.
  D. register: `tfds.folder_dataset.write_metadata` + pack_meta.json in a temporary directory, renamed into place
     at the end: a killed build leaves no dataset, and the records are the same for any number of workers.
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time

import numpy as np

from dispersion_jax.data import inputs as inputs_lib
from dispersion_jax.data import packed
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import DataError

TRAIN, VALIDATION = inputs_lib.TRAIN, inputs_lib.VALIDATION
SPLITS = inputs_lib.SPLITS


@dataclasses.dataclass(frozen=True)
class BuildReport:
  path: str  # the built dataset (packed.open_path(path))
  fingerprint: str
  seq_len: int
  built: bool  # False: it existed already, nothing was done
  units: int  # work units of the input
  tokenized_units: int  # units tokenized by this run (the others came from the token cache)
  documents: dict  # split -> documents
  tokens: dict  # split -> tokens of the stream (EOS included)
  blocks: dict  # split -> blocks of seq_len + 1 tokens
  dropped_tail_tokens: dict  # split -> tokens of the last partial block, not in any block
  seconds: float
  workers: int
  ignored_files: tuple = ()  # input files of other splits (e.g. test-*.parquet), not read

  @property
  def tokens_per_s(self) -> float:
    return sum(self.tokens.values()) / max(self.seconds, 1e-9)

  def summary(self) -> str:
    def per(d):
      return ", ".join(f"{s} {d[s]:,}" for s in SPLITS)

    head = "built" if self.built else "already built"
    lines = [
        f"{head}: {self.path}",
        f"  fingerprint {self.fingerprint}, seq_len {self.seq_len}, {self.units} work units "
        f"({self.tokenized_units} tokenized now), {self.workers} worker(s)",
        f"  documents: {per(self.documents)}",
        f"  tokens: {per(self.tokens)}",
        f"  blocks: {per(self.blocks)}",
        f"  dropped tail tokens: {per(self.dropped_tail_tokens)}",
    ]
    if self.built:
      lines.append(f"  time {self.seconds:.1f} s, {self.tokens_per_s:,.0f} tokens/s")
    if self.ignored_files:
      lines.append(
          f"  not read (other splits): {', '.join(self.ignored_files[:5])}"
          f"{' ...' if len(self.ignored_files) > 5 else ''}"
      )
    return "\n".join(lines)


def _report_from_meta(
    path: str, meta: dict, *, built: bool, tokenized: int, seconds: float, workers: int
) -> BuildReport:
  return BuildReport(
      path,
      meta["fingerprint"],
      meta["seq_len"],
      built,
      meta["units"],
      tokenized,
      meta["documents"],
      meta["tokens"],
      meta["blocks"],
      meta["dropped_tail_tokens"],
      seconds,
      workers,
      tuple(meta.get("ignored_files", ())),
  )


def _resolve_workers(workers: int | None, cfg: DataConfig) -> int:
  n = cfg.build_workers if workers is None else workers
  if n < 0:
    raise DataError(f"workers={n} must be >= 0 (0 = one per CPU core)")
  return n or os.cpu_count() or 1


def _init_worker() -> None:
  # One thread per worker process: the pool is the parallelism (HF tokenizers read this before they start).
  os.environ["RAYON_NUM_THREADS"] = "1"
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Runner:
  """Runs tasks in this process (workers=1) or in a pool of spawned worker processes, created on first use."""

  def __init__(self, workers: int):
    self.workers, self._pool = workers, None

  def imap(self, fn, tasks: list):
    """The results of fn(task), in any order."""
    if self.workers <= 1 or len(tasks) <= 1:
      for t in tasks:
        yield fn({**t, "threads": True} if "threads" in t else t)
      return
    if self._pool is None:
      # spawn, not fork: the parent may have imported JAX (threads, maybe a device runtime); fork is unsafe then.
      # A pool that loses a worker (OOM kill, ...) raises BrokenProcessPool instead of waiting forever.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          min(self.workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
      )
    futures = [self._pool.submit(fn, t) for t in tasks]
    try:
      for f in concurrent.futures.as_completed(futures):
        yield f.result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise DataError(
          f"a build worker process died ({e}); re-run (finished work is kept), or use fewer workers "
          "if it ran out of memory"
      ) from None
    finally:
      for f in futures:
        f.cancel()

  def close(self, ok: bool) -> None:
    if self._pool is None:
      return
    if ok:
      self._pool.shutdown(wait=True)
      return
    # Failed or interrupted: do not wait for the running units (minutes for big ones); their files are written
    # to temporary names, so a stopped worker leaves nothing that a re-run would take for finished work.
    procs = list((getattr(self._pool, "_processes", None) or {}).values())  # private: no public terminate()
    self._pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
      p.terminate()
    for p in procs:
      p.join(timeout=10)


def _bar(total: int, desc: str, unit: str, progress: bool):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale_tmp(root: str, name: str) -> None:
  """Removes temporary directories of killed builds of this dataset (on this host, by a process that is gone)."""
  if not os.path.isdir(root):
    return
  host = socket.gethostname()
  for entry in os.listdir(root):
    if not entry.startswith(f".tmp-{name}-"):
      continue
    owner_host, _, pid = entry[len(f".tmp-{name}-") :].rpartition("-")
    if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
      shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def build(
    data_cfg: DataConfig,
    *,
    tokenizer: str,
    seq_len: int,
    workers: int | None = None,
    progress: bool = True,
    keep_tokens: bool = True,
) -> BuildReport:
  """Builds the dataset of `data_cfg` for this tokenizer and seq_len (a no-op if it exists) and returns a report.

  `workers` (None = data_cfg.build_workers; 0 = one per CPU core; 1 = in this process) never changes the output.
  `keep_tokens=False` deletes the stage-A token files afterwards (a new seq_len then tokenizes again).
  Raises DataError (one line naming the file or setting) for missing, unreadable, non-UTF-8 or empty input.
  """
  t0 = time.perf_counter()
  n_workers = _resolve_workers(workers, data_cfg)
  ident = packed.identify(data_cfg, tokenizer=tokenizer, seq_len=seq_len)
  if os.path.isdir(ident.path):
    ds = packed.open_identity(ident)
    report = _report_from_meta(
        ident.path, ds.meta, built=False, tokenized=0, seconds=time.perf_counter() - t0, workers=0
    )
    if progress:
      print(report.summary(), flush=True)
    return report
  units = inputs_lib.plan_units(data_cfg, ident.inputs)
  if not units:
    raise DataError(f"{ident.inputs.describe()} is empty (no rows in its files); add documents")
  runner, ok = _Runner(n_workers), False
  tmp = os.path.join(ident.root, f".tmp-{ident.name}-{socket.gethostname()}-{os.getpid()}")
  try:
    token_path = ident.token_path(units)
    tokenized = _tokenize(data_cfg, ident, units, token_path, runner, progress)
    stats = [_load_stats(token_path, i) for i in range(len(units))]
    _clean_stale_tmp(ident.root, ident.name)
    os.makedirs(tmp)
    plan = _plan(ident, stats, token_path)
    shard_sizes = _pack(ident, plan, tmp, token_path, runner, progress)
    meta = _register(ident, plan, shard_sizes, units, tmp)
    try:
      os.rename(tmp, ident.path)
    except OSError:
      if not os.path.isdir(ident.path):  # not a concurrent build of the same dataset that finished first
        raise
      shutil.rmtree(tmp, ignore_errors=True)
    ok = True
  finally:
    runner.close(ok)
    if not ok:
      shutil.rmtree(tmp, ignore_errors=True)
  if not keep_tokens:
    shutil.rmtree(token_path, ignore_errors=True)
  report = _report_from_meta(
      ident.path, meta, built=True, tokenized=tokenized, seconds=time.perf_counter() - t0, workers=n_workers
  )
  if progress:
    print(report.summary(), flush=True)
  return report


def open_or_build_default(
    data_cfg: DataConfig, *, tokenizer: str, seq_len: int, workers: int | None = 1, progress: bool = True
) -> packed.PackedDataset:
  """The built dataset; the embedded default corpus (source="default") is built here on first use, any other
  source must have been built (`python -m dispersion_jax.data.build`): a DataError names the command.
  `workers=1` by default: the corpus is small (~2M tokens, a few seconds), so tokenizer threads in this process
  beat starting worker processes; None = data_cfg.build_workers.

  Multi-process runs: call it on process 0 first (then a barrier), then on the others (they only open)."""
  ident = packed.identify(data_cfg, tokenizer=tokenizer, seq_len=seq_len)
  if data_cfg.source == "default" and not os.path.isdir(ident.path):
    build(data_cfg, tokenizer=tokenizer, seq_len=seq_len, workers=workers, progress=progress)
  return packed.open_identity(ident)


# ---------------------------------------------------------------------------------------------------------------
# Stage A


def _load_stats(token_dir: str, index: int) -> dict | None:
  try:
    with open(inputs_lib.unit_stats_file(token_dir, index)) as fh:
      return json.load(fh)
  except (OSError, json.JSONDecodeError):
    return None


def _tokenize(
    cfg: DataConfig, ident: packed.Identity, units: list, token_path: str, runner: _Runner, progress: bool
) -> int:
  os.makedirs(token_path, exist_ok=True)
  info = os.path.join(token_path, "tokens.json")
  if not os.path.exists(info):
    with open(f"{info}.tmp{os.getpid()}", "w") as fh:
      json.dump(
          {
              "token_key": ident.token_key(units),
              "tokenizer": ident.tokenizer,
              "dtype": ident.dtype,
              "units": [inputs_lib.unit_key(u) for u in units],
              "input": ident.inputs.identity,
          },
          fh,
      )
    os.replace(f"{info}.tmp{os.getpid()}", info)
  pending = [i for i in range(len(units)) if _load_stats(token_path, i) is None]
  tasks = [
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
  with _bar(sum(units[i].nbytes for i in pending) or len(pending), "tokenize", "B", progress) as bar:
    bar.unit_scale = True
    tokens = 0
    for stats in runner.imap(inputs_lib.tokenize_unit, tasks):
      tokens += sum(stats["tokens"].values())
      bar.update(units[stats["unit"]].nbytes or 1)
      bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
  return len(pending)


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


def _plan(ident: packed.Identity, stats: list, token_path: str) -> dict:
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
      lens = np.load(inputs_lib.unit_file(token_path, u, file_split, "len"))
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


def _pack(ident: packed.Identity, plans: dict, tmp: str, token_path: str, runner: _Runner, progress: bool) -> dict:
  from tensorflow_datasets.core import naming  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415

  width = ident.seq_len + 1
  per_shard = max(1, packed.SHARD_BYTES // (np.dtype(ident.dtype).itemsize * width))
  plan_dir = os.path.join(tmp, ".plan")
  os.makedirs(plan_dir)
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
  sizes = {split: [0] * (-(-plans[split].blocks // per_shard)) for split in plans}
  with _bar(sum(p.blocks for p in plans.values()), "pack", "block", progress) as bar:
    results = runner.imap(packed.write_shard, tasks)
    for split, shard, nbytes, blocks in results:
      sizes[split][shard] = nbytes
      bar.update(blocks)
  shutil.rmtree(plan_dir)
  return sizes


def _register(ident: packed.Identity, plans: dict, sizes: dict, units: list, tmp: str) -> dict:
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from tensorflow_datasets.core import naming  # noqa: PLC0415

  width = ident.seq_len + 1
  per_shard = max(1, packed.SHARD_BYTES // (np.dtype(ident.dtype).itemsize * width))
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


if __name__ == "__main__":  # the command line lives in cli/data.py; keeps `python -m dispersion_jax.data.build`
  from dispersion_jax.cli.data import main

  main()
