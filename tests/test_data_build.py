"""Building pre-packed datasets: determinism over workers and work units, splits, all-or-nothing builds,
re-packing, the cache and its fingerprint."""

import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_build_helpers import EOS, L, all_blocks, random_text, text_dir_cfg

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import corpus, inputs, packed, readers, token_files
from dispersion_jax.data.config import DataConfig
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import DataError


def _expected_stream(docs, split: str) -> np.ndarray:
  tok = get_tokenizer("gpt2")
  held = [(i, t) for i, t in docs if (corpus.doc_hash(i) < corpus.VALIDATION_FRACTION) == (split == "validation")]
  return np.concatenate([tok.encode(t) + [EOS] for _, t in held])


@pytest.fixture(scope="module")
def small_units():
  """Tiny work units and shards, so every input spans several units and each split several files."""
  mp = pytest.MonkeyPatch()
  mp.setattr(inputs, "UNIT_BYTES", 700)
  mp.setattr(packed, "SHARD_BYTES", 40 * 2 * (L + 1))
  yield
  mp.undo()


@pytest.fixture(scope="module")
def built(mixed, small_units, tmp_path_factory):
  """The mixed input built with 1 worker (in this process) and with 2 worker processes."""
  root, _ = mixed
  out = {}
  for workers in (1, 2):
    cache = tmp_path_factory.mktemp(f"cache{workers}")
    report = build_lib.build(text_dir_cfg(root, cache), tokenizer="gpt2", seq_len=L, workers=workers, progress=False)
    out[workers] = (cache, report)
  return out


def test_one_and_two_workers_write_byte_identical_datasets(built):
  (c1, r1), (c2, r2) = built[1], built[2]
  assert r1.units > 8 and r1.tokenized_units == r1.units and r2.workers == 2
  assert r1.fingerprint == r2.fingerprint and r1.blocks == r2.blocks
  files = sorted(p.relative_to(c1) for p in c1.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(c2) for p in c2.rglob("*") if p.is_file())
  shards = [f for f in files if ".array_record-" in f.name]
  assert len([f for f in shards if "-train." in f.name]) > 3  # several shards, written by both workers
  for f in files:
    assert (c1 / f).read_bytes() == (c2 / f).read_bytes(), f
  assert not any(p.name.startswith(".tmp") for p in (c1 / packed.DATASET_NAME).iterdir())


def test_blocks_are_the_documents_of_the_input_in_order(mixed, built):
  _, docs = mixed
  cache, report = built[1]
  ds = packed.open_path(report.path)
  assert ds.dtype == np.uint16 and ds.seq_len == L and ds.eos_id == EOS
  for split in ("train", "validation"):
    blocks = all_blocks(ds, split)
    expected = _expected_stream(docs, split)
    n = len(expected) // (L + 1)
    assert blocks.shape == (n, L + 1) and n == report.blocks[split]
    np.testing.assert_array_equal(blocks.reshape(-1), expected[: n * (L + 1)])
    assert report.dropped_tail_tokens[split] == len(expected) - n * (L + 1)
  val = [i for i, _ in docs if corpus.doc_hash(i) < corpus.VALIDATION_FRACTION]
  assert report.documents == {"train": len(docs) - len(val), "validation": len(val)} and len(val) >= 1


def test_decoded_documents_are_the_input_texts(mixed, built):
  _, docs = mixed
  ds = packed.open_path(built[1][1].path)
  tok = get_tokenizer("gpt2")
  stream = all_blocks(ds, "train").reshape(-1)
  ends = np.flatnonzero(stream == EOS)
  texts = [tok.decode(d[:-1]) for d in np.split(stream[: ends[-1] + 1], ends[:-1] + 1)]
  want = [t for i, t in docs if corpus.doc_hash(i) >= corpus.VALIDATION_FRACTION]
  assert texts == want[: len(texts)] and len(texts) >= len(want) - 2
  assert {"a/part.parquet", "b.jsonl", "c/d/141.txt", "c/140.txt"} <= {i.split(":")[0].split("@")[0] for i, _ in docs}


def test_doc_starts_mark_every_document_start(built):
  ds = packed.open_path(built[1][1].path)
  tokens, starts = ds.read("train", range(ds.num_blocks("train")))
  for t, s in zip(tokens, starts):
    np.testing.assert_array_equal(s, np.flatnonzero(t[:-1] == EOS) + 1)  # after each EOS, never at 0


def test_unit_size_does_not_change_the_records(mixed, built, tmp_path, monkeypatch):
  monkeypatch.setattr(inputs, "UNIT_BYTES", 64 << 20)
  report = build_lib.build(text_dir_cfg(mixed[0], tmp_path), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.units == 3 and report.fingerprint == built[1][1].fingerprint  # parquet, jsonl, one txt group
  a, b = packed.open_path(report.path), packed.open_path(built[1][1].path)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(all_blocks(a, split), all_blocks(b, split))


def test_second_build_is_a_no_op_and_open_finds_it(mixed, built, small_units):
  cache, first = built[1]
  again = build_lib.build(text_dir_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert not again.built and again.path == first.path and again.blocks == first.blocks
  assert packed.open_packed(text_dir_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L).path == first.path


def test_killed_build_leaves_no_dataset_and_a_rerun_finishes(mixed, built, small_units, tmp_path, monkeypatch):
  cfg = text_dir_cfg(mixed[0], tmp_path)
  units = inputs.plan_units(cfg, inputs.describe_inputs(cfg))
  real = readers.unit_docs

  def dies_at_unit_3(unit, *a, **kw):
    if unit == units[3]:
      raise KeyboardInterrupt  # as a kill would: not an error the build could handle
    return real(unit, *a, **kw)

  monkeypatch.setattr(readers, "unit_docs", dies_at_unit_3)
  with pytest.raises(KeyboardInterrupt):
    build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  root = tmp_path / packed.DATASET_NAME
  assert sorted(p.name for p in root.iterdir()) == ["tokens"]  # no dataset, no temporary dir
  ident = packed.identify(cfg, tokenizer="gpt2", seq_len=L)
  done = sorted(p.name for p in pathlib.Path(ident.token_path(units)).glob("u*.json"))
  assert done == ["u000000.json", "u000001.json", "u000002.json"]
  with pytest.raises(DataError, match="data.build --config"):
    packed.open_packed(cfg, tokenizer="gpt2", seq_len=L)
  monkeypatch.setattr(readers, "unit_docs", real)
  report = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.built and report.tokenized_units == report.units - 3
  a, b = packed.open_packed(cfg, tokenizer="gpt2", seq_len=L), packed.open_path(built[1][1].path)
  np.testing.assert_array_equal(all_blocks(a, "train"), all_blocks(b, "train"))


def test_new_seq_len_repacks_without_tokenizing(mixed, built, small_units, monkeypatch):
  cache, first = built[1]

  def no_tokenizing(*_):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(token_files, "tokenize_unit", no_tokenizing)
  report = build_lib.build(text_dir_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=24, workers=1, progress=False)
  assert report.built and report.tokenized_units == 0 and report.seq_len == 24
  assert report.fingerprint != first.fingerprint
  long, short = packed.open_path(report.path), packed.open_path(first.path)
  a, b = all_blocks(long, "train").reshape(-1), all_blocks(short, "train").reshape(-1)
  n = min(len(a), len(b))
  assert long.num_blocks("train") == first.tokens["train"] // 25
  np.testing.assert_array_equal(a[:n], b[:n])


def test_edited_input_gets_a_new_fingerprint(mixed, tmp_path):
  import shutil

  copy = shutil.copytree(mixed[0], tmp_path / "copy")
  fp = packed.identify(text_dir_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint
  assert packed.identify(text_dir_cfg(mixed[0], tmp_path / "elsewhere"), tokenizer="gpt2", seq_len=L).fingerprint == fp
  os.utime(copy / "b.jsonl", (0, 0))  # touched only: same data, same cache
  assert packed.identify(text_dir_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint == fp
  (copy / "c" / "140.txt").write_text("edited")
  assert packed.identify(text_dir_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint != fp
  assert packed.identify(text_dir_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L + 1).fingerprint != fp


# --- splits -------------------------------------------------------------------------------------------------


def test_split_files_give_the_validation_set(tmp_path):
  src = tmp_path / "wiki"
  src.mkdir()
  rng = np.random.default_rng(1)
  texts = {
      s: [f"{s} {i} " + random_text(i, rng) for i in range(n)]
      for s, n in (("train", 60), ("validation", 12), ("test", 5))
  }
  for s, t in texts.items():
    pq.write_table(pa.table({"text": t}), src / f"{s}-00000-of-00001.parquet")
  report = build_lib.build(text_dir_cfg(src, tmp_path / "c"), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.documents == {"train": 60, "validation": 12}
  assert report.ignored_files == ("test-00000-of-00001.parquet",)
  ds = packed.open_path(report.path)
  tok = get_tokenizer("gpt2")
  want = np.concatenate([tok.encode(t) + [EOS] for t in texts["validation"]])
  got = all_blocks(ds, "validation").reshape(-1)
  np.testing.assert_array_equal(got, want[: len(got)])
  hashed = build_lib.build(
      text_dir_cfg(src, tmp_path / "c", validation_split=""), tokenizer="gpt2", seq_len=L, workers=1, progress=False
  )
  assert sum(hashed.documents.values()) == 60 and hashed.fingerprint != report.fingerprint  # train files only


def test_hash_split_keeps_a_document_in_each_split(tmp_path):
  src = tmp_path / "few"
  src.mkdir()
  for i in range(3):
    (src / f"{i}.txt").write_text(" ".join([f"word{i}"] * 40))
  ids = [f"{i}.txt" for i in range(3)]
  assert all(corpus.doc_hash(i) >= corpus.VALIDATION_FRACTION for i in ids)  # none would be held out
  report = build_lib.build(text_dir_cfg(src, tmp_path / "c"), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.documents == {"train": 2, "validation": 1}
  held = min(ids, key=corpus.doc_hash)
  first = all_blocks(packed.open_path(report.path), "validation")[0]
  assert get_tokenizer("gpt2").decode(first).startswith(" ".join([f"word{held[0]}"] * 3))


def test_default_corpus_is_built_on_first_use(tmp_path):
  cfg = DataConfig(cache_dir=str(tmp_path))
  ds = build_lib.open_or_build_default(cfg, tokenizer="gpt2", seq_len=256, workers=1, progress=False)
  ids = [i for i, _ in corpus.default_docs()]
  n_val = sum(corpus.doc_hash(i) < corpus.VALIDATION_FRACTION for i in ids)
  assert ds.meta["documents"] == {"train": len(ids) - n_val, "validation": n_val} and len(ids) == 3414
  assert ds.num_blocks("train") > 7000 and ds.num_blocks("validation") > 100
  assert build_lib.open_or_build_default(cfg, tokenizer="gpt2", seq_len=256).path == ds.path  # found, not rebuilt


# --- the cache: errors in one line, naming the fix ----------------------------------------------------------


def test_missing_cache_names_the_build_command(mixed, tmp_path):
  with pytest.raises(DataError) as e:
    packed.open_packed(text_dir_cfg(mixed[0], tmp_path), tokenizer="gpt2", seq_len=L)
  msg = str(e.value)
  assert "python -m dispersion_jax data-build --config" in msg and "seq_len=16" in msg and "\n" not in msg


def test_wrong_fingerprint_on_disk_is_a_data_error(mixed, built):
  cache, report = built[1]
  meta_path = pathlib.Path(report.path) / packed.META_FILE
  original = meta_path.read_text()
  try:
    meta_path.write_text(original.replace(report.fingerprint, "0" * 16))
    with pytest.raises(DataError, match="fingerprint 0000000000000000, expected") as e:
      packed.open_packed(text_dir_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L)
    assert "\n" not in str(e.value)
  finally:
    meta_path.write_text(original)
