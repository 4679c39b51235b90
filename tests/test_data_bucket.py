"""The prepared dataset in a bucket (gs://, a GCS emulator on loopback): a build reads its sources from a bucket and
publishes into one, with the pool or with two Beam workers, and the published objects are the bytes of the same
build on a local disk; training reads the shards from the bucket directly; an upload that did not finish is never
taken for a dataset, and re-running the command finishes it. (Training and resuming on a bucket cache, one host
and two: test_bucket_run.py and test_distributed_storage.py.)"""

import json
import os
import pathlib

import numpy as np
import pytest
from data_build_helpers import text_dir_cfg

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import inputs, packed
from dispersion_jax.errors import DataError, DatasetNotBuiltError
from dispersion_jax.storage import paths, transfer

L = 16
TWO_BEAM_WORKERS = "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing"


@pytest.fixture(autouse=True)
def small_units(monkeypatch):
  """Work units and shards small enough that the mixed corpus has several of each (the layout, not the records)."""
  monkeypatch.setattr(inputs, "UNIT_BYTES", 8 << 10)
  monkeypatch.setattr(packed, "SHARD_BYTES", 4 << 10)


@pytest.fixture(scope="module")
def sources(mixed, gcs) -> str:
  """The mixed corpus (parquet, jsonl, nested txt) uploaded to the bucket."""
  where = gcs.prefix("sources")
  transfer.upload_dir(mixed[0], where)
  return where


def without_description(files: dict[str, bytes]) -> dict[str, bytes]:
  """The dataset's files, its TFDS description (which names data.text_dir as given) left out."""
  info = json.loads(files["dataset_info.json"])
  return {**files, "dataset_info.json": json.dumps({**info, "description": None}).encode()}


def local_files(directory: str) -> dict[str, bytes]:
  root = pathlib.Path(directory)
  files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
  return without_description(files)


def bucket_files(prefix: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in paths.path(prefix).walk():
    base = os.fspath(dirpath)
    base = base if "://" in base else f"gs://{base}"
    for n in names:
      out[f"{base}/{n}"[len(prefix) + 1 :]] = paths.path(f"{base}/{n}").read_bytes()
  return without_description(out)


@pytest.mark.parametrize("executor", ["pool", "beam, two workers"])
def test_a_build_from_a_bucket_into_a_bucket_publishes_the_bytes_of_the_local_build(
    mixed, sources, gcs, tmp_path, executor
):
  if executor.startswith("beam"):
    pytest.importorskip("apache_beam")
  beam = TWO_BEAM_WORKERS if executor.startswith("beam") else None
  local = build_lib.build(text_dir_cfg(mixed[0], tmp_path / "local"), tokenizer="gpt2", seq_len=L, progress=False)
  cfg = text_dir_cfg(sources, gcs.prefix("cache"), staging_dir=str(tmp_path / "staging"))
  remote = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=2, progress=False, beam_options=beam)

  assert remote.path.startswith("gs://") and remote.built
  assert remote.fingerprint == local.fingerprint  # sources in a bucket identify the dataset as local ones do
  published = bucket_files(remote.path)
  assert published.pop(transfer.MARKER) == b""
  want = local_files(local.path)
  assert len([n for n in want if ".array_record-" in n]) > 2  # several shards per split
  assert published == want  # every object, byte for byte
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists("gs:")

  # Training's reader on the bucket: the raw ArrayRecord shards read in place (no download), equal to the local.
  ds, ref = packed.open_packed(cfg, tokenizer="gpt2", seq_len=L), packed.open_path(local.path)
  for split in packed.SPLITS:
    n = ref.num_blocks(split)
    assert ds.num_blocks(split) == n and ds._records(split) is not None
    got, want_blocks = ds.read(split, range(n)), ref.read(split, range(n))
    assert np.array_equal(got[0], want_blocks[0])
    assert all(np.array_equal(a, b) for a, b in zip(got[1], want_blocks[1]))

  again = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, progress=False)
  assert not again.built and again.path == remote.path  # a finished dataset in the bucket is not rebuilt


def test_an_upload_that_did_not_finish_is_never_a_dataset_and_a_rerun_finishes_it(mixed, sources, gcs, tmp_path):
  cfg = text_dir_cfg(sources, gcs.prefix("cache"), staging_dir=str(tmp_path / "staging"))

  def refuse_the_marker(method, path):  # every shard uploads; the marker, written last, is refused (403: no retry)
    return 403 if method in ("POST", "PUT") and transfer.MARKER in path else None

  with gcs.failing(refuse_the_marker), pytest.raises(DataError) as failed:
    build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  message = str(failed.value)
  assert "\n" not in message and "nothing was published" in message and "re-run the same command" in message
  ident = packed.identify(cfg, tokenizer="gpt2", seq_len=L)
  assert paths.path(ident.path).joinpath(packed.META_FILE).exists()  # the objects are there...
  assert not ident.built()  # ...but without the marker they are not a dataset
  with pytest.raises(DatasetNotBuiltError):
    packed.open_packed(cfg, tokenizer="gpt2", seq_len=L)
  with pytest.raises(DataError, match="unfinished upload"):
    packed.PackedDataset(ident.path)

  done = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert done.built and ident.built()
  local = build_lib.build(text_dir_cfg(mixed[0], tmp_path / "local"), tokenizer="gpt2", seq_len=L, progress=False)
  published = bucket_files(done.path)
  published.pop(transfer.MARKER)
  assert published == local_files(local.path)


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("cache_dir", "gs://no-such-bucket-dispersion/cache", "cannot write to the bucket"),
        ("cache_dir", "s3://some-bucket/cache", "s3:// cannot hold this"),
        ("staging_dir", "gs://dispersion-test/staging", "must be a local or mounted directory"),
        ("text_dir", "gs://dispersion-test/**/*.jsonl", "** cannot be used in a bucket"),
        ("text_dir", "gs://dispersion-test/no-such-prefix", "does not exist"),
    ],
)
def test_bucket_paths_the_build_cannot_use_are_one_line_before_anything_is_written(
    mixed, sources, gcs, tmp_path, key, value, says
):
  settings = {"text_dir": sources, "cache_dir": gcs.prefix("cache"), "staging_dir": str(tmp_path / "staging")}
  settings[key] = value
  cfg = text_dir_cfg(settings.pop("text_dir"), settings.pop("cache_dir"), **settings)
  with pytest.raises((DataError, ValueError)) as failed:
    build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert says in str(failed.value) and "\n" not in str(failed.value)
  assert not (tmp_path / "staging").exists()


def test_a_runner_on_other_machines_needs_a_staging_dir_they_all_mount(mixed, sources, gcs):
  pytest.importorskip("apache_beam")
  dataflow = "runner=DataflowRunner,project=p,region=us-central1,temp_location=gs://dispersion-test/tmp"
  cfg = text_dir_cfg(sources, gcs.prefix("cache"))
  with pytest.raises(DataError) as failed:
    build_lib.build(cfg, tokenizer="gpt2", seq_len=L, progress=False, beam_options=dataflow)
  assert "set --config.data.staging_dir" in str(failed.value) and "\n" not in str(failed.value)
  assert not os.path.exists(packed.identify(cfg, tokenizer="gpt2", seq_len=L).staging)
