"""The build's stages as one Apache Beam pipeline: any Beam runner (FnApiRunner / DirectRunner with worker processes
on one host, Dataflow, Flink, Spark) runs the same stage functions as the single-host pool of `build.py`.

  build.build(cfg, tokenizer=..., seq_len=..., beam_options="runner=FnApiRunner,direct_num_workers=2,"
              "direct_running_mode=multi_processing")

The options are TFDS's `--beam_pipeline_options` (`tfds build`): comma-separated, each passed to Beam as `--KEY=VALUE`.
The pipeline, one node per stage of `build_stages.py` (no stage is written twice):

  work units -> spread -> tokenize (token_files.tokenize_unit, one unit per element)
             -> all units -> plan (build_stages.plan + pack_tasks, one element)
             -> shards -> spread -> pack (packed.write_shard, one shard per element)
             -> all shards -> register (build_stages.register: TFDS metadata + pack_meta.json, last)

Every element's output is a pure function of the element, so the records are the same bytes for any runner and
any number of workers, and the same as the pool's (`tests/test_beam_build.py`). Workers write the token files
to the token cache and the shards to the build's temporary directory (both must be on storage every worker sees:
a local disk for the local runners; a shared mount for others, until the stages read and write gs:// through
storage/paths.py: docs/data-build-beam.md, "Buckets"); `build.py` makes the temporary directory the dataset after the
pipeline has finished (one call, metadata already last inside it). A user error in a worker (a malformed row, a
missing field) does not fail the pipeline with a worker traceback: the stage returns it as a value, the pipeline
stops producing, and `run` raises it as the one-line DataError (the first one in unit order).
"""

import contextlib
import json
import os
import signal
import sys
import threading

from dispersion_jax.data import build_stages, packed, token_files
from dispersion_jax.errors import DataError

ERROR_FILE = ".build_error.json"  # in the temporary directory: the user error a worker met
LOG_FILE = ".beam.log"  # in the temporary directory while the pipeline runs: what Beam and its workers print
LOG_TAIL = 40  # lines of it shown when the pipeline fails for a reason other than a user error
# Added unless given: the local workers' INFO lines (a dozen per worker and bundle) are no news on success.
DEFAULT_OPTIONS = ("default_sdk_harness_log_level=ERROR",)
_WORKER_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one thread per worker, as the pool


def _import_beam():
  """apache_beam, imported without its import-time note on stderr (no Google Cloud client libraries: not needed
  for local runs), which would precede a command's one-line error."""
  import logging  # noqa: PLC0415

  root = logging.getLogger()
  level, handlers = root.level, list(root.handlers)
  root.setLevel(logging.ERROR)
  try:
    import apache_beam  # noqa: PLC0415
  finally:
    root.setLevel(level)
    root.handlers[:] = handlers  # logging.warning() installs a stderr handler on a bare root logger
  return apache_beam


def pipeline_options(text: str) -> list[str]:
  """`runner=DirectRunner,direct_num_workers=2` -> ["--runner=DirectRunner", "--direct_num_workers=2"] (TFDS's
  syntax). The runner must be named: left to itself Beam takes DirectRunner, which first tries PrismRunner (a
  binary it downloads from GitHub; offline it fails at once and falls back to FnApiRunner). FnApiRunner is the
  local engine without that detour: the same `direct_num_workers` and `direct_running_mode` options. An unknown
  runner is a DataError, before anything is created."""
  flags = [f"--{opt.strip()}" for opt in text.split(",") if opt.strip()]
  given = {f.partition("=")[0] for f in flags}
  flags += [f"--{opt}" for opt in DEFAULT_OPTIONS if f"--{opt.partition('=')[0]}" not in given]
  try:
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: PLC0415
    from apache_beam.runners import runner as runner_lib  # noqa: PLC0415
  except ImportError:
    raise DataError(
        "--beam_pipeline_options needs Apache Beam; install it with `pip install -e .[beam]` "
        "(requirements.txt installs it)"
    ) from None
  name = PipelineOptions(flags).view_as(StandardOptions).runner
  if not name:
    raise DataError(
        f"--beam_pipeline_options={text!r} names no runner; add runner=FnApiRunner or DirectRunner (one host), "
        "or DataflowRunner, FlinkRunner, SparkRunner"
    )
  try:
    runner_lib.create_runner(name)
  except (ValueError, ImportError) as e:
    raise DataError(
        f"--beam_pipeline_options: unknown Beam runner {name!r} ({' '.join(str(e).split())[:160]}); use "
        "runner=FnApiRunner or DirectRunner (one host), or DataflowRunner, FlinkRunner, SparkRunner"
    ) from None
  return flags


# The functions Beam calls carry no type annotations: Beam would take them for element type hints.


def _stage(task, fn):
  """fn(task), or the user error it raised as a value: ("error", where, message)."""
  try:
    return fn(task)
  except DataError as e:
    return ("error", (task.get("index", -1), task.get("split", ""), task.get("shard", -1)), str(e))


def _errors(results):
  return sorted(r for r in results if isinstance(r, tuple) and r and r[0] == "error")


def _record_error(tmp: str, errors: list) -> None:
  with open(os.path.join(tmp, ERROR_FILE), "w") as fh:
    json.dump(errors[0][2], fh)


def _plan(stats, ident, n_units, token_path, tmp, per_shard):
  """Stage B on one worker: every unit's stats (the ones tokenized now and the cached ones) -> the shard tasks."""
  errors = _errors(stats)
  if errors:
    _record_error(tmp, errors)
    return {"error": True}
  try:
    plans = build_stages.plan(ident, [build_stages.load_stats(token_path, i) for i in range(n_units)], token_path)
  except DataError as e:
    _record_error(tmp, [("error", (), str(e))])
    return {"error": True}
  tasks = build_stages.pack_tasks(ident, plans, tmp, token_path, per_shard)
  return {"tasks": tasks, "plans": build_stages.counts(plans)}


def _register(written, planned, ident, units, tmp, per_shard):
  """Stage D on one worker, after every shard is written: the dataset's metadata, last."""
  if planned.get("error"):
    return
  errors = _errors(written)
  if errors:
    _record_error(tmp, errors)
    return
  plans = planned["plans"]
  sizes = build_stages.shard_sizes(ident, plans, written, per_shard)
  build_stages.register(ident, plans, sizes, units, tmp, per_shard)


@contextlib.contextmanager
def _stderr_to(path: str):
  """This process's stderr (fd 2, which local Beam workers inherit) goes to `path` for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 2)
  os.close(fd)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _interruptible(fn) -> None:
  """fn() in a thread while this one waits, so that SIGTERM and Ctrl-C reach the build at once: a local runner
  waiting on its workers does not return to Python's signal handling until they finish. On an interruption the
  pipeline thread is left behind (a daemon: the command exits, and its local workers end when their control
  channel to this process closes)."""
  failure = []

  def target():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
      failure.append(e)

  thread = threading.Thread(target=target, name="beam-pipeline", daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(0.1)
  if failure:
    raise failure[0]


def _quiet_runner_threads() -> None:
  """The runner's threads outlive an interrupted build until the process exits; their errors about the workers
  killed under them would follow the command's one line. Process-wide: only ever called when the build is ending
  by an interruption."""
  import logging  # noqa: PLC0415

  logging.disable(logging.CRITICAL)
  threading.excepthook = lambda args: None


def _kill_local_workers() -> None:
  """SIGKILL to the local Beam workers of this process (FnApiRunner's `sdk_worker_main` processes and the shells
  that started them; their work is disposable: finished units are on disk). Read from /proc (Linux); elsewhere
  nothing is done and the command exits when the workers finish their bundles."""
  try:
    entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
  except OSError:
    return
  parent, cmdline = {}, {}
  for pid in entries:
    try:
      with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
      with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmdline[pid] = fh.read()
    except OSError:
      continue
    parent[pid] = int(text[text.rindex(")") + 2 :].split()[1])
  mine, todo = set(), [os.getpid()]
  while todo:
    pid = todo.pop()
    kids = [c for c, pp in parent.items() if pp == pid and c not in mine]
    mine.update(kids)
    todo.extend(kids)
  for pid in sorted(mine):
    if b"sdk_worker_main" in cmdline.get(pid, b""):
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass


def _tail(path: str, n: int) -> str:
  try:
    with open(path, errors="replace") as fh:
      return "".join(fh.readlines()[-n:])
  except OSError:
    return ""


def run(cfg, ident: packed.Identity, units: list, token_path: str, tmp: str, flags: list[str]) -> tuple[dict, int]:
  """Runs the stages on Beam into `tmp` (which exists); returns (pack_meta, units tokenized now)."""
  beam = _import_beam()
  from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

  tasks = build_stages.tokenize_tasks(cfg, ident, units, token_path)
  per_shard = build_stages.shard_blocks(ident)  # decided here, as the work units: the layout is the driver's
  # Local worker processes (FnApiRunner starts them through /bin/sh, so lifeline.py's parent check does not
  # apply) inherit this environment: one tokenizer thread each, as the pool's. They end when their control
  # channel to this process closes, however it ends (kill -9 included: tests/test_beam_build.py).
  env = dict(_WORKER_ENV)
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  log = os.path.join(tmp, LOG_FILE)

  def pipeline():
    with beam.Pipeline(options=PipelineOptions(flags)) as p:
      stats = (
          p
          | "work units" >> beam.Create(tasks)
          | "spread units" >> beam.Reshuffle()
          | "tokenize" >> beam.Map(_stage, token_files.tokenize_unit)
      )
      planned = (
          stats
          | "all units" >> beam.combiners.ToList()
          | "plan" >> beam.Map(_plan, ident, len(units), token_path, tmp, per_shard)
      )
      written = (
          planned
          | "shards" >> beam.FlatMap(lambda planned: planned.get("tasks", []))
          | "spread shards" >> beam.Reshuffle()
          | "pack" >> beam.Map(_stage, packed.write_shard)
      )
      _ = (
          written
          | "all shards" >> beam.combiners.ToList()
          | "register" >> beam.Map(_register, beam.pvalue.AsSingleton(planned), ident, units, tmp, per_shard)
      )

  try:
    with _stderr_to(log):
      _interruptible(pipeline)
  except Exception:
    print(f"Beam's output (last {LOG_TAIL} lines):\n{_tail(log, LOG_TAIL)}", file=sys.stderr, flush=True)
    raise
  except BaseException:  # SIGTERM or Ctrl-C: the runner would wait for its workers' bundles before it lets go
    _quiet_runner_threads()  # what they say about the killed workers is not news: the command is ending
    _kill_local_workers()
    raise
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  os.remove(log)  # not part of the dataset
  error = os.path.join(tmp, ERROR_FILE)
  if os.path.exists(error):
    with open(error) as fh:
      raise DataError(json.load(fh))
  with open(os.path.join(tmp, packed.META_FILE)) as fh:
    return json.load(fh), len(tasks)
