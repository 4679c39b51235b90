"""The build as an Apache Beam pipeline (`--beam_pipeline_options`): two local worker processes write the same bytes
as one worker and as today's worker pool, a finished build is not redone, a killed build re-run finishes with the
same bytes, and bad input or options end in one line that creates nothing.

The runner is always named: FnApiRunner, Beam's local engine. DirectRunner would first try PrismRunner, a binary
it downloads from GitHub (offline it falls back to FnApiRunner at once; with a network the tests would depend on
GitHub)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from command_helpers import CONFIG, descendants, env, wait_gone
from conftest import REPO
from data_build_helpers import WORDS, text_dir_cfg

from dispersion_jax.cli import data as data_cli
from dispersion_jax.data import beam_build, inputs, packed
from dispersion_jax.data import build as build_lib

pytest.importorskip("apache_beam")

L = 64
TWO_WORKERS = "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing"
ONE_WORKER = "runner=FnApiRunner,direct_num_workers=1"  # in this process
DEFAULTS = {(inputs, "UNIT_BYTES"): inputs.UNIT_BYTES, (packed, "SHARD_BYTES"): packed.SHARD_BYTES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  """~2 MB of jsonl, parquet (several row groups) and txt files."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(28)

  def text():
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 400)))) + "."

  for f in range(2):
    pq.write_table(pa.table({"text": [text() for _ in range(500)]}), root / f"p{f}.parquet", row_group_size=100)
    with open(root / f"j{f}.jsonl", "w") as fh:
      fh.writelines(json.dumps({"text": text(), "n": i}) + "\n" for i in range(500))
  (root / "txt").mkdir()
  for i in range(40):
    (root / "txt" / f"{i}.txt").write_text(text())
  return root


def _files(cache: pathlib.Path) -> dict:
  return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(corpus, tmp_path_factory):
  """The corpus built by today's pool (1 worker), by Beam with 1 worker and by Beam with 2 worker processes, with
  work units and shards small enough that each worker gets several of both."""
  mp = pytest.MonkeyPatch()
  mp.setattr(inputs, "UNIT_BYTES", 200 << 10)
  mp.setattr(packed, "SHARD_BYTES", 100 << 10)
  out = {}
  for name, options in (("pool", None), ("beam1", ONE_WORKER), ("beam2", TWO_WORKERS)):
    cache = tmp_path_factory.mktemp(name)
    report = build_lib.build(
        text_dir_cfg(corpus, cache), tokenizer="gpt2", seq_len=L, workers=1, progress=False, beam_options=options
    )
    out[name] = (cache, report)
  yield out
  mp.undo()


def test_two_beam_workers_write_the_bytes_of_one_worker_and_of_the_pool(builds):
  (pool_cache, pool), (_, one), (_, two) = builds["pool"], builds["beam1"], builds["beam2"]
  assert pool.runner == "pool" and two.runner == "FnApiRunner" and two.workers == 2
  assert pool.units > 8 and two.tokenized_units == two.units == pool.units
  assert pool.fingerprint == one.fingerprint == two.fingerprint and pool.blocks == two.blocks
  reference = _files(pool_cache)
  shards = [f for f in reference if "-train.array_record-" in f]
  assert len(shards) > 3  # several shards per split
  for name in ("beam1", "beam2"):
    files = _files(builds[name][0])
    assert sorted(files) == sorted(reference)  # the token cache, the shards, the metadata; no log, no temporary dir
    for f, data in reference.items():
      assert files[f] == data, (name, f)


def test_rerunning_a_finished_build_does_nothing(corpus, builds, monkeypatch):
  cache, first = builds["beam2"]

  def no_pipeline(*_):
    raise AssertionError("started a pipeline")

  monkeypatch.setattr(beam_build, "run", no_pipeline)
  again = build_lib.build(
      text_dir_cfg(corpus, cache), tokenizer="gpt2", seq_len=L, progress=False, beam_options=TWO_WORKERS
  )
  assert not again.built and again.path == first.path and again.fingerprint == first.fingerprint


def _build_command(corpus: pathlib.Path, cache: pathlib.Path, *extra: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "dispersion_jax",
      "data-build",
      "--config",
      CONFIG,
      "--config.data.source=text_dir",
      f"--config.data.text_dir={corpus}",
      f"--config.data.cache_dir={cache}",
      f"--config.seq_len={L}",
      *extra,
  ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_killed_build_rerun_gives_the_same_bytes(corpus, builds, tmp_path, monkeypatch, sig):
  """kill -9 or SIGTERM of the build while its two Beam workers tokenize: no dataset, no process left (SIGTERM:
  one line, exit 75); the re-run tokenizes only the rest and writes the records of the pool's build (the shard
  layout here is the default one)."""
  for (module, name), value in DEFAULTS.items():  # the units and shards of the build command
    monkeypatch.setattr(module, name, value)
  cache = tmp_path / "cache"
  proc = subprocess.Popen(
      _build_command(corpus, cache, f"--beam_pipeline_options={TWO_WORKERS}"),
      cwd=REPO,
      env=env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  tokens = cache / packed.DATASET_NAME / "tokens"
  deadline = time.monotonic() + 180
  while not list(tokens.glob("*/u*.json")):  # the first finished work unit
    assert proc.poll() is None and time.monotonic() < deadline, "the build ended or never tokenized"
    time.sleep(0.05)
  kids = descendants(proc.pid)
  os.kill(proc.pid, sig)
  err = proc.communicate(timeout=60)[1]
  if sig == signal.SIGTERM:
    assert proc.returncode == 75 and err.strip().splitlines()[-1].startswith("interrupted (SIGTERM): the finished")
  assert not wait_gone(kids, 30)  # the Beam workers end with the build (their control channel closes)
  assert [p.name for p in (cache / packed.DATASET_NAME).iterdir() if not p.name.startswith(".tmp")] == ["tokens"]
  report = build_lib.build(  # one worker, in this process: the output does not depend on the count
      text_dir_cfg(corpus, cache), tokenizer="gpt2", seq_len=L, progress=False, beam_options=ONE_WORKER
  )
  pool = builds["pool"][1]
  assert report.built and report.tokenized_units < report.units and report.fingerprint == pool.fingerprint
  assert not any(p.name.startswith(".tmp") for p in (cache / packed.DATASET_NAME).iterdir())
  a, b = packed.open_path(report.path), packed.open_path(pool.path)
  for split in ("train", "validation"):
    n = b.num_blocks(split)
    ta, sa = a.read(split, range(n))
    tb, sb = b.read(split, range(n))
    assert a.num_blocks(split) == n
    np.testing.assert_array_equal(ta, tb)
    assert all(np.array_equal(x, y) for x, y in zip(sa, sb))


def _one_line_error(capfd, argv: list[str]) -> str:
  with pytest.raises(SystemExit) as e:
    data_cli.main(argv)
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  return lines[0]


def _argv(text_dir, cache, options=TWO_WORKERS) -> list[str]:
  return _build_command(text_dir, cache, f"--beam_pipeline_options={options}")[4:]


def _parquet_without_text(d: pathlib.Path) -> None:
  pq.write_table(pa.table({"body": ["x"]}), d / "a.parquet")


def _jsonl_with_a_bad_row(d: pathlib.Path) -> None:
  (d / "a.jsonl").write_text('{"text": "fine"}\n{"text": "ok"}\n{"body": "no text"}\n')


def _one_txt(d: pathlib.Path) -> None:
  (d / "a.txt").write_text("fine")


@pytest.mark.parametrize(
    "make, options, match",
    [
        (lambda d: str(d / "*.parquet"), TWO_WORKERS, r"no \.parquet, \.jsonl or \.txt files"),
        (_parquet_without_text, TWO_WORKERS, r"a\.parquet has no column 'text'"),
        # one worker, in this process: a worker's error travels the same way, and two start in ~20 s here
        (_jsonl_with_a_bad_row, ONE_WORKER, r"a\.jsonl: line 3 \(byte 32\)"),
        (_one_txt, "runner=NoSuchRunner", r"unknown Beam runner 'NoSuchRunner'"),
        (_one_txt, "direct_num_workers=2", r"names no runner; add runner=FnApiRunner or DirectRunner"),
    ],
    ids=["glob-matches-nothing", "missing-column", "malformed-row", "unknown-runner", "no-runner"],
    # (a gs:// source or cache: test_a_bucket_is_refused_until_the_stages_speak_it)
)
def test_bad_input_or_options_end_in_one_line_and_create_nothing(tmp_path, capfd, make, options, match):
  src, cache = tmp_path / "in", tmp_path / "cache"
  src.mkdir()
  given = make(src)
  line = _one_line_error(capfd, _argv(given if isinstance(given, str) else src, cache, options))
  assert re.search(match, line), line
  made = sorted(p.name for p in (cache / packed.DATASET_NAME).iterdir()) if cache.exists() else []
  assert made in ([], ["tokens"])  # a malformed row is met while tokenizing: the units before it are kept
  assert not any(cache.rglob(".tmp-*"))


def test_an_output_prefix_holding_another_dataset_is_refused(corpus, builds, tmp_path, capfd):
  cache = tmp_path / "cache"
  ident = packed.identify(text_dir_cfg(corpus, cache), tokenizer="gpt2", seq_len=L)
  os.makedirs(ident.path)
  other = json.loads((pathlib.Path(builds["pool"][1].path) / packed.META_FILE).read_text())
  (pathlib.Path(ident.path) / packed.META_FILE).write_text(json.dumps({**other, "fingerprint": "0123456789abcdef"}))
  before = _files(cache)
  line = _one_line_error(capfd, _argv(corpus, cache))
  assert "has fingerprint 0123456789abcdef, expected" in line
  assert _files(cache) == before


@pytest.mark.parametrize("key, says", [("text_dir", "does not exist"), ("cache_dir", "cannot write to the bucket")])
def test_a_bucket_that_does_not_exist_is_one_line_and_nothing_local_appears(corpus, gcs, tmp_path, capfd, monkeypatch, key, says):
  """gs:// at either end is read and written through storage/ (tests/test_data_bucket.py); a bucket that is not there
  is one line naming the setting, and no local folder named `gs:` appears."""
  monkeypatch.chdir(tmp_path)
  missing = "gs://no-such-bucket-dispersion"
  text_dir, cache = (f"{missing}/corpus", tmp_path / "cache") if key == "text_dir" else (corpus, f"{missing}/cache")
  line = _one_line_error(capfd, _argv(text_dir, cache))
  assert f"data.{key}=" in line and f"{missing}/" in line and says in line
  assert list(tmp_path.iterdir()) == []
