"""Building the pre-packed dataset, in parallel, deterministically, all or nothing.

  report = build(data_cfg, tokenizer="gpt2", seq_len=1024, workers=16)
  ds = packed.open_packed(data_cfg, tokenizer="gpt2", seq_len=1024)      # or open_or_build_default(...)

Stages (`build_stages.py` runs them; `inputs.py` defines the units, `token_files.py` tokenizes one, `packed.py` is
the format):
  A. tokenize: worker processes (spawn: JAX may be imported, and threaded, in the parent) turn each work unit
     into token files per split (documents with EOS appended, and their lengths) under the token cache dir, which
     has no seq_len in its key; a finished unit is kept, so a re-run after a kill tokenizes only the rest and a new
     seq_len re-packs without tokenizing at all.
  B. plan (this process): each split's stream = its documents in unit order; N = tokens // (seq_len + 1) blocks.
     Without a validation split in the input, documents with `corpus.doc_hash(id) < VALIDATION_FRACTION` are held
     out, and at least one document is kept in each split (as builder.py does).
  C. pack: workers write fixed block ranges (shards) of each stream into ArrayRecord files.
  D. register: `tfds.folder_dataset.write_metadata` + pack_meta.json in a temporary directory, renamed into place
     at the end (`publish`, one call): a killed build leaves no dataset, and the records are the same for any
     number of workers. A cache in a bucket (gs://): the stages run in a local staging directory (ArrayRecord
     writes local files only) and `publish` uploads the dataset with its marker object last.

Two executors of the same stage functions: this module's worker pool (one host), or an Apache Beam pipeline
(`beam_options=`, `beam_build.py`: DirectRunner with worker processes, Dataflow, Flink, Spark). The bytes of the
dataset do not depend on which one ran, nor on its number of workers.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import signal
import socket
import time

from dispersion_jax.data import beam_build, build_stages, packed
from dispersion_jax.data import inputs as inputs_lib
from dispersion_jax.data.config import DataConfig
from dispersion_jax.data.inputs import SPLITS
from dispersion_jax.errors import DataError
from dispersion_jax.parallel import lifeline
from dispersion_jax.storage import bucket, paths, transfer


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
  runner: str = "pool"  # "pool" (this module's processes) or the Beam runner that ran the stages

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
        f"({self.tokenized_units} tokenized now), "
        + (f"{self.workers} worker(s)" if self.runner == "pool" else f"Beam {self.runner}"),
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
    path: str, meta: dict, *, built: bool, tokenized: int, seconds: float, workers: int, runner: str = "pool"
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
      runner,
  )


def _resolve_workers(workers: int | None, cfg: DataConfig) -> int:
  n = cfg.build_workers if workers is None else workers
  if n < 0:
    raise DataError(f"workers={n} must be >= 0 (0 = one per CPU core)")
  return n or os.cpu_count() or 1


def _init_worker() -> None:
  """Runs first in every worker process (after its imports). One thread per worker (the pool is the parallelism;
  HF tokenizers read these before they start). Ctrl-C and SIGTERM sent to the whole process group (a terminal, a
  scheduler) are the parent's to handle: it stops the pool (SIGKILL) and reports the interruption, instead of
  seeing a worker die first. The worker ends when the build process does, however it ends: `_Runner` sets
  lifeline.ENV, which the package applies first thing in the worker (dispersion_jax/__init__.py)."""
  os.environ["RAYON_NUM_THREADS"] = "1"
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  lifeline.from_environment()  # in case the package was imported before the variable was set


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
          min(self.workers, len(tasks)),
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker,
      )
    # The pool starts its workers here, on submit. Each ends with this process, even after a `kill -9` of it
    # (lifeline.py; their work is disposable): the variable reaches them, and only them.
    before = os.environ.get(lifeline.ENV)
    os.environ[lifeline.ENV] = lifeline.environment(os.getpid(), signal.SIGKILL)
    try:
      futures = [self._pool.submit(fn, t) for t in tasks]
    finally:
      if before is None:
        os.environ.pop(lifeline.ENV, None)
      else:
        os.environ[lifeline.ENV] = before
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
    # to temporary names, so a killed worker leaves nothing that a re-run would take for finished work.
    procs = list((getattr(self._pool, "_processes", None) or {}).values())  # private: no public terminate()
    self._pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
      p.kill()
    for p in procs:
      p.join(timeout=10)


def _clean_stale_tmp(root: str, name: str) -> None:
  """Removes temporary directories of killed builds of this dataset (on this host, by a process that is gone)."""
  if not os.path.isdir(root):
    return
  host = socket.gethostname()
  for entry in os.listdir(root):
    if not entry.startswith(f".tmp-{name}-"):
      continue
    owner_host, _, pid = entry[len(f".tmp-{name}-") :].rpartition("-")
    if owner_host == host and pid.isdigit() and not lifeline.alive(int(pid)):
      shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def publish(tmp: str, final: str) -> None:
  """The finished temporary directory (metadata written last inside it) becomes the dataset, in one step: a
  reader sees no dataset or all of it. The build's one place that makes a dataset appear."""
  try:
    transfer.publish(tmp, final)  # local: os.rename; gs://: upload, marker object last
  except OSError:
    if paths.is_remote(final) or not os.path.isdir(final):  # not a concurrent build that finished first
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def build(
    data_cfg: DataConfig,
    *,
    tokenizer: str,
    seq_len: int,
    workers: int | None = None,
    progress: bool = True,
    keep_tokens: bool = True,
    beam_options: str | None = None,
) -> BuildReport:
  """Builds the dataset of `data_cfg` for this tokenizer and seq_len (a no-op if it exists) and returns a report.

  `workers` (None = data_cfg.build_workers; 0 = one per CPU core; 1 = in this process) never changes the output.
  `beam_options` ("runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing", TFDS's
  syntax): run the stages as an Apache Beam pipeline instead of the worker pool (`workers` is then unused); the
  same bytes. `keep_tokens=False` deletes the stage-A token files afterwards (a new seq_len then tokenizes again).
  Raises DataError (one line naming the file or setting) for missing, unreadable, non-UTF-8 or empty input.
  """
  t0 = time.perf_counter()
  flags = None if beam_options is None else beam_build.pipeline_options(beam_options)
  runner_name = "pool" if flags is None else next(f for f in flags if f.startswith("--runner="))[len("--runner=") :]
  n_workers = _resolve_workers(workers, data_cfg) if flags is None else _beam_workers(flags)
  ident = packed.identify(data_cfg, tokenizer=tokenizer, seq_len=seq_len)
  _check_staging(data_cfg, ident, runner_name)
  if ident.built():
    ds = packed.open_identity(ident)
    report = _report_from_meta(
        ident.path, ds.meta, built=False, tokenized=0, seconds=time.perf_counter() - t0, workers=0
    )
    if progress:
      print(report.summary(), flush=True)
    return report
  bucket.check_writable(ident.root, what="data.cache_dir")  # gs://: one line now, not after tokenizing
  units = inputs_lib.plan_units(data_cfg, ident.inputs)
  if not units:
    raise DataError(f"{ident.inputs.describe()} is empty (no rows in its files); add documents")
  runner, ok = _Runner(n_workers if flags is None else 1), False
  tmp = os.path.join(ident.staging, f".tmp-{ident.name}-{socket.gethostname()}-{os.getpid()}")
  try:
    token_path = ident.token_path(units)
    if flags is None:
      tokenized = build_stages.tokenize(data_cfg, ident, units, token_path, runner.imap, progress)
      stats = [build_stages.load_stats(token_path, i) for i in range(len(units))]
      _clean_stale_tmp(ident.staging, ident.name)
      os.makedirs(tmp)
      plan = build_stages.plan(ident, stats, token_path)
      shard_sizes = build_stages.pack(ident, plan, tmp, token_path, runner.imap, progress)
      meta = build_stages.register(ident, plan, shard_sizes, units, tmp)
    else:
      _clean_stale_tmp(ident.staging, ident.name)
      os.makedirs(tmp)
      meta, tokenized = beam_build.run(data_cfg, ident, units, token_path, tmp, flags)
    try:
      publish(tmp, ident.path)
    except Exception as e:  # noqa: BLE001 - gcsfs raises OSError, HttpError, ...: the upload is what failed
      if not paths.is_remote(ident.path):
        raise
      raise DataError(
          f"uploading the dataset to {ident.path} failed ({type(e).__name__}: {inputs_lib.one_line(e)}); nothing "
          "was published (no marker) and the token files are kept: re-run the same command to finish"
      ) from None
    ok = True
  finally:
    runner.close(ok)
    if not ok:
      shutil.rmtree(tmp, ignore_errors=True)
  if not keep_tokens:
    shutil.rmtree(token_path, ignore_errors=True)
  report = _report_from_meta(
      ident.path,
      meta,
      built=True,
      tokenized=tokenized,
      seconds=time.perf_counter() - t0,
      workers=n_workers,
      runner=runner_name,
  )
  if progress:
    print(report.summary(), flush=True)
  return report


LOCAL_RUNNERS = ("pool", "FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def _check_staging(cfg: DataConfig, ident: packed.Identity, runner: str) -> None:
  """A runner whose workers run on other machines (Dataflow, Flink, Spark) writes token files and shards where the
  launching host must find them: a build into a bucket stages them in this host's temporary directory unless
  data.staging_dir names a mount every worker sees."""
  if runner not in LOCAL_RUNNERS and ident.staging != ident.root and not cfg.staging_dir:
    raise DataError(
        f"{runner} workers cannot write to this host's temporary directory ({ident.staging}); set "
        "--config.data.staging_dir to a directory every worker mounts (gcsfuse, Filestore); the dataset still "
        "goes to data.cache_dir"
    )


def _beam_workers(flags: list[str]) -> int:
  """The local worker count a DirectRunner was given (for the report); 0 = the runner decides."""
  for f in flags:
    if f.startswith("--direct_num_workers="):
      value = f.partition("=")[2]
      return int(value) if value.isdigit() else 0
  return 0


def open_or_build_default(
    data_cfg: DataConfig, *, tokenizer: str, seq_len: int, workers: int | None = 1, progress: bool = True
) -> packed.PackedDataset:
  """The built dataset; the embedded default corpus (source="default") is built here on first use, any other
  source must have been built (`python -m dispersion_jax data-build`): a DataError names the command.
  `workers=1` by default: the corpus is small (~2M tokens, a few seconds), so tokenizer threads in this process
  beat starting worker processes; None = data_cfg.build_workers.

  Multi-process runs: call it on process 0 first (then a barrier), then on the others (they only open)."""
  ident = packed.identify(data_cfg, tokenizer=tokenizer, seq_len=seq_len)
  if data_cfg.source == "default" and not ident.built():
    build(data_cfg, tokenizer=tokenizer, seq_len=seq_len, workers=workers, progress=progress)
  return packed.open_identity(ident, packed.build_command(data_cfg, tokenizer=tokenizer, seq_len=seq_len))

