"""Building pre-packed datasets: inputs (parquet / jsonl / txt / TFDS / default corpus), work units, determinism,
splits, all-or-nothing builds, re-packing, errors."""

import json
import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import corpus, inputs, packed
from dispersion_jax.data.config import DataConfig
from dispersion_jax.errors import ConfigError, DataError
from dispersion_jax.tokenizer import get_tokenizer

EOS = 50256
L = 16
WORDS = "alpha beta gamma delta river stone light garden silver morning quiet north".split()


def _text(i: int, rng) -> str:
  return f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + "."


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[pathlib.Path, list[tuple[str, str]]]:
  """Parquet (several row groups), jsonl (with a blank line and a blank text) and nested txt files, and the
  (doc id, text) of every document in build order."""
  root = tmp_path_factory.mktemp("mixed")
  rng = np.random.default_rng(0)
  docs = []
  (root / "a").mkdir()
  texts = [_text(i, rng) for i in range(70)]
  pq.write_table(pa.table({"id": list(range(70)), "text": texts}), root / "a" / "part.parquet", row_group_size=9)
  docs += [(f"a/part.parquet:{i}", t) for i, t in enumerate(texts)]
  lines, offset = [], 0
  for i in range(70, 140):
    line = json.dumps({"text": _text(i, rng), "n": i}) + "\n"
    docs.append((f"b.jsonl@{offset}", json.loads(line)["text"]))
    lines.append(line)
    offset += len(line.encode())
    if i == 100:
      lines.append("\n")  # a blank line: skipped
      offset += 1
  lines.append(json.dumps({"text": "   "}) + "\n")  # a blank document: dropped
  (root / "b.jsonl").write_text("".join(lines))
  (root / "c" / "d").mkdir(parents=True)
  for i in range(140, 170):
    rel = f"c/{'d/' if i % 2 else ''}{i}.txt"
    (root / rel).write_text(_text(i, rng))
    docs.append((rel, (root / rel).read_text()))
  (root / "notes.md").write_text("not an input")
  (root / ".hidden.txt").write_text("hidden: not an input")
  order = {
      rel: k for k, rel in enumerate(sorted(["a/part.parquet", "b.jsonl", *(d for d, _ in docs if d.endswith(".txt"))]))
  }
  ranked = sorted(enumerate(docs), key=lambda kd: (order[kd[1][0].split(":")[0].split("@")[0]], kd[0]))
  return root, [d for _, d in ranked]


def _cfg(text_dir, cache, **kw) -> DataConfig:
  return DataConfig(source="text_dir", text_dir=str(text_dir), cache_dir=str(cache), **kw)


def _all_blocks(ds: packed.PackedDataset, split: str) -> np.ndarray:
  tokens, _ = ds.read(split, range(ds.num_blocks(split)))
  return tokens


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
    report = build_lib.build(_cfg(root, cache), tokenizer="gpt2", seq_len=L, workers=workers, progress=False)
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
    blocks = _all_blocks(ds, split)
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
  stream = _all_blocks(ds, "train").reshape(-1)
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
  report = build_lib.build(_cfg(mixed[0], tmp_path), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.units == 3 and report.fingerprint == built[1][1].fingerprint  # parquet, jsonl, one txt group
  a, b = packed.open_path(report.path), packed.open_path(built[1][1].path)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(_all_blocks(a, split), _all_blocks(b, split))


def test_second_build_is_a_no_op_and_open_finds_it(mixed, built, small_units):
  cache, first = built[1]
  again = build_lib.build(_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert not again.built and again.path == first.path and again.blocks == first.blocks
  assert packed.open_packed(_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L).path == first.path


def test_killed_build_leaves_no_dataset_and_a_rerun_finishes(mixed, built, small_units, tmp_path, monkeypatch):
  cfg = _cfg(mixed[0], tmp_path)
  units = inputs.plan_units(cfg, inputs.describe_inputs(cfg))
  real = inputs.unit_docs

  def dies_at_unit_3(unit, *a, **kw):
    if unit == units[3]:
      raise KeyboardInterrupt  # as a kill would: not an error the build could handle
    return real(unit, *a, **kw)

  monkeypatch.setattr(inputs, "unit_docs", dies_at_unit_3)
  with pytest.raises(KeyboardInterrupt):
    build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  root = tmp_path / packed.DATASET_NAME
  assert sorted(p.name for p in root.iterdir()) == ["tokens"]  # no dataset, no temporary dir
  ident = packed.identify(cfg, tokenizer="gpt2", seq_len=L)
  done = sorted(p.name for p in pathlib.Path(ident.token_path(units)).glob("u*.json"))
  assert done == ["u000000.json", "u000001.json", "u000002.json"]
  with pytest.raises(DataError, match="data.build --config"):
    packed.open_packed(cfg, tokenizer="gpt2", seq_len=L)
  monkeypatch.setattr(inputs, "unit_docs", real)
  report = build_lib.build(cfg, tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.built and report.tokenized_units == report.units - 3
  a, b = packed.open_packed(cfg, tokenizer="gpt2", seq_len=L), packed.open_path(built[1][1].path)
  np.testing.assert_array_equal(_all_blocks(a, "train"), _all_blocks(b, "train"))


def test_new_seq_len_repacks_without_tokenizing(mixed, built, small_units, monkeypatch):
  cache, first = built[1]

  def no_tokenizing(*_):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(inputs, "tokenize_unit", no_tokenizing)
  report = build_lib.build(_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=24, workers=1, progress=False)
  assert report.built and report.tokenized_units == 0 and report.seq_len == 24
  assert report.fingerprint != first.fingerprint
  long, short = packed.open_path(report.path), packed.open_path(first.path)
  a, b = _all_blocks(long, "train").reshape(-1), _all_blocks(short, "train").reshape(-1)
  n = min(len(a), len(b))
  assert long.num_blocks("train") == first.tokens["train"] // 25
  np.testing.assert_array_equal(a[:n], b[:n])


def test_edited_input_gets_a_new_fingerprint(mixed, tmp_path):
  import shutil

  copy = shutil.copytree(mixed[0], tmp_path / "copy")
  fp = packed.identify(_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint
  assert packed.identify(_cfg(mixed[0], tmp_path / "elsewhere"), tokenizer="gpt2", seq_len=L).fingerprint == fp
  os.utime(copy / "b.jsonl", (0, 0))  # touched only: same data, same cache
  assert packed.identify(_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint == fp
  (copy / "c" / "140.txt").write_text("edited")
  assert packed.identify(_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L).fingerprint != fp
  assert packed.identify(_cfg(copy, tmp_path), tokenizer="gpt2", seq_len=L + 1).fingerprint != fp


# --- splits and grouping ------------------------------------------------------------------------------------


def test_split_files_give_the_validation_set(tmp_path):
  src = tmp_path / "wiki"
  src.mkdir()
  rng = np.random.default_rng(1)
  texts = {
      s: [f"{s} {i} " + _text(i, rng) for i in range(n)] for s, n in (("train", 60), ("validation", 12), ("test", 5))
  }
  for s, t in texts.items():
    pq.write_table(pa.table({"text": t}), src / f"{s}-00000-of-00001.parquet")
  report = build_lib.build(_cfg(src, tmp_path / "c"), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.documents == {"train": 60, "validation": 12}
  assert report.ignored_files == ("test-00000-of-00001.parquet",)
  ds = packed.open_path(report.path)
  tok = get_tokenizer("gpt2")
  want = np.concatenate([tok.encode(t) + [EOS] for t in texts["validation"]])
  got = _all_blocks(ds, "validation").reshape(-1)
  np.testing.assert_array_equal(got, want[: len(got)])
  hashed = build_lib.build(
      _cfg(src, tmp_path / "c", validation_split=""), tokenizer="gpt2", seq_len=L, workers=1, progress=False
  )
  assert sum(hashed.documents.values()) == 60 and hashed.fingerprint != report.fingerprint  # train files only


def test_hash_split_keeps_a_document_in_each_split(tmp_path):
  src = tmp_path / "few"
  src.mkdir()
  for i in range(3):
    (src / f"{i}.txt").write_text(" ".join([f"word{i}"] * 40))
  ids = [f"{i}.txt" for i in range(3)]
  assert all(corpus.doc_hash(i) >= corpus.VALIDATION_FRACTION for i in ids)  # none would be held out
  report = build_lib.build(_cfg(src, tmp_path / "c"), tokenizer="gpt2", seq_len=L, workers=1, progress=False)
  assert report.documents == {"train": 2, "validation": 1}
  held = min(ids, key=corpus.doc_hash)
  first = _all_blocks(packed.open_path(report.path), "validation")[0]
  assert get_tokenizer("gpt2").decode(first).startswith(" ".join([f"word{held[0]}"] * 3))


WIKI = [
    "",
    " = Alpha = \n",
    "",
    " Alpha one . \n",
    " = = Part = = \n",
    " Alpha two . \n",
    "",
    " = Beta = \n",
    " Beta one . \n",
    " = Gamma = \n",
    "",
    " Gamma one . \n",
    " Gamma two . \n",
    " = = Part = = \n",
    " Gamma three . \n",
    " = Delta = \n",
    " Delta one . \n",
]
ARTICLES = [("Alpha", 1, 7), ("Beta", 7, 9), ("Gamma", 9, 15), ("Delta", 15, 17)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt"])
@pytest.mark.parametrize("unit_bytes", [1, 40, 64 << 20])
def test_wikitext_rows_group_into_articles(tmp_path, monkeypatch, fmt, unit_bytes):
  monkeypatch.setattr(inputs, "UNIT_BYTES", unit_bytes)
  path = tmp_path / f"wiki.{fmt}"
  if fmt == "parquet":
    pq.write_table(pa.table({"text": WIKI}), path, row_group_size=2)
  elif fmt == "jsonl":
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in WIKI))
  else:
    path.write_text("".join(r or "\n" for r in WIKI))
  cfg = _cfg(tmp_path, tmp_path, doc_grouping="wikitext")
  units = inputs.plan_units(cfg, inputs.describe_inputs(cfg))
  assert len(units) > 1 or unit_bytes > 100
  docs = [d for u in units for d in inputs.unit_docs(u, "text", "wikitext")]
  assert [t.splitlines()[0] for _, t in docs] == [f" = {name} = " for name, _, _ in ARTICLES]
  for (_, text), (_, a, b) in zip(docs, ARTICLES):
    assert text == "".join(r or ("\n" if fmt == "txt" else "") for r in WIKI[a:b])
  if fmt == "parquet":
    assert [i for i, _ in docs] == [f"wiki.parquet:{a}" for _, a, _ in ARTICLES]
  rows = [d for u in units for d in inputs.unit_docs(u, "text", "row")]
  assert len(rows) == sum(1 for r in WIKI if r.strip())


def test_default_corpus_is_built_on_first_use(tmp_path):
  cfg = DataConfig(cache_dir=str(tmp_path))
  ds = build_lib.open_or_build_default(cfg, tokenizer="gpt2", seq_len=256, workers=1, progress=False)
  ids = [i for i, _ in corpus.default_docs()]
  n_val = sum(corpus.doc_hash(i) < corpus.VALIDATION_FRACTION for i in ids)
  assert ds.meta["documents"] == {"train": len(ids) - n_val, "validation": n_val} and len(ids) == 3414
  assert ds.num_blocks("train") > 7000 and ds.num_blocks("validation") > 100
  assert build_lib.open_or_build_default(cfg, tokenizer="gpt2", seq_len=256).path == ds.path  # found, not rebuilt


class PackedInputForTest(tfds.core.GeneratorBasedBuilder):
  """A user-prepared TFDS text dataset (rows like wikitext's) with a `text` feature."""

  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}), disable_shuffling=True
    )  # rows in order, as wikitext grouping needs

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(WIKI * 3), "test": self._generate_examples(WIKI[7:15])}

  def _generate_examples(self, rows):
    for i, r in enumerate(rows):
      yield i, {"text": r}


def test_tfds_input_splits_and_grouping(tmp_path):
  no_stats = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  PackedInputForTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(download_config=no_stats)
  cfg = DataConfig(
      source="tfds",
      tfds_name="packed_input_for_test",
      data_dir=str(tmp_path),
      validation_split="test",
      doc_grouping="wikitext",
  )
  report = build_lib.build(cfg, tokenizer="gpt2", seq_len=4, workers=1, progress=False)
  assert report.documents == {"train": 12, "validation": 2}  # Beta + Gamma from "test"
  tok = get_tokenizer("gpt2")
  val = _all_blocks(packed.open_path(report.path), "validation").reshape(-1)
  want = np.concatenate([tok.encode("".join(WIKI[a:b])) + [EOS] for _, a, b in ARTICLES[1:3]])
  np.testing.assert_array_equal(val, want[: len(val)])
  with pytest.raises(DataError, match="has no split 'dev'") as e:
    build_lib.build(
        DataConfig(source="tfds", tfds_name="packed_input_for_test", data_dir=str(tmp_path), validation_split="dev"),
        tokenizer="gpt2",
        seq_len=4,
        progress=False,
    )
  assert "\n" not in str(e.value)


# --- errors: one line, naming the fix -----------------------------------------------------------------------


def _one_line_error(cfg, match, seq_len=L):
  with pytest.raises(DataError, match=match) as e:
    build_lib.build(cfg, tokenizer="gpt2", seq_len=seq_len, workers=1, progress=False)
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


def test_missing_cache_names_the_build_command(mixed, tmp_path):
  with pytest.raises(DataError) as e:
    packed.open_packed(_cfg(mixed[0], tmp_path), tokenizer="gpt2", seq_len=L)
  msg = str(e.value)
  assert "python -m dispersion_jax.data.build --config" in msg and "seq_len=16" in msg and "\n" not in msg


def test_wrong_fingerprint_on_disk_is_a_data_error(mixed, built):
  cache, report = built[1]
  meta_path = pathlib.Path(report.path) / packed.META_FILE
  original = meta_path.read_text()
  try:
    meta_path.write_text(original.replace(report.fingerprint, "0" * 16))
    with pytest.raises(DataError, match="fingerprint 0000000000000000, expected") as e:
      packed.open_packed(_cfg(mixed[0], cache), tokenizer="gpt2", seq_len=L)
    assert "\n" not in str(e.value)
  finally:
    meta_path.write_text(original)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.txt", b"ok \xff\xfe not utf-8", r"bad\.txt is not UTF-8 text \(bad byte at offset 3\)"),
        (
            "bad.jsonl",
            b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
            r"bad\.jsonl is not UTF-8 text \(bad byte at offset 3",
        ),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad\.parquet is not a readable parquet file"),
        ("bad.jsonl", b'{"text": "fine"}\n{"title": "no text"}\n', r"bad\.jsonl: the line at byte 17 .* 'text' string"),
    ],
)
def test_unreadable_inputs_name_the_file(tmp_path, name, content, match):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / name).write_bytes(content)
  _one_line_error(_cfg(tmp_path / "in", tmp_path / "c"), match)
  assert not (tmp_path / "c" / packed.DATASET_NAME).exists() or [
      p.name for p in (tmp_path / "c" / packed.DATASET_NAME).iterdir()
  ] == ["tokens"]


def test_empty_and_missing_inputs(tmp_path):
  (tmp_path / "none").mkdir()
  (tmp_path / "none" / "x.md").write_text("not an input")
  _one_line_error(_cfg(tmp_path / "none", tmp_path), "has no .parquet, .jsonl or .txt files")
  _one_line_error(_cfg(tmp_path / "absent", tmp_path), "does not exist; set --config.data.text_dir")
  _one_line_error(_cfg("", tmp_path), "needs data.text_dir")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "x.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
  (tmp_path / "blank" / "y.txt").write_text("\n\n")
  _one_line_error(_cfg(tmp_path / "blank", tmp_path), "has no non-empty documents")
  (tmp_path / "cols").mkdir()
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "cols" / "x.parquet")
  _one_line_error(
      _cfg(tmp_path / "cols", tmp_path), r"has no column 'text' \(columns: body\); set --config.data.text_key"
  )
  (tmp_path / "tiny").mkdir()
  for i in range(60):
    (tmp_path / "tiny" / f"{i}.txt").write_text("a b")
  _one_line_error(_cfg(tmp_path / "tiny", tmp_path), "fewer than one block of seq_len\\+1=1025", seq_len=1024)
  _one_line_error(DataConfig(source="tfds", tfds_name="no_such_dataset_xyz", data_dir=str(tmp_path)), "tfds build")


def test_data_config_checks_its_values():
  for kw, match in [
      ({"source": "web"}, "data.source='web'"),
      ({"doc_grouping": "para"}, "data.doc_grouping"),
      ({"build_workers": -1}, "data.build_workers"),
      ({"read_threads": -2}, "data.read_threads"),
      ({"doc_grouping": "wikitext"}, "default corpus"),
  ]:
    with pytest.raises(ConfigError, match=match):
      DataConfig(**kw)
  with pytest.raises(ConfigError, match="data.shards is obsolete"):
    DataConfig.from_dict({"shards": 2})
  with pytest.raises(ConfigError, match="not a data setting"):
    DataConfig.from_dict({"sorce": "default"})
  assert DataConfig.from_dict({"source": "text_dir", "text_dir": "x"}).text_dir == "x"
  import dataclasses

  for f in dataclasses.fields(DataConfig):
    assert f.default is None or type(f.default) in (str, int, float, bool), f.name


def test_glob_and_split_names(mixed):
  root, docs = mixed
  cfg = DataConfig(source="text_dir", text_dir=str(root / "c" / "**" / "*.txt"))
  got = inputs.describe_inputs(cfg)
  assert [f.rel for f in got.files] == sorted(d[2:] for d, _ in docs if d.endswith(".txt"))  # from the glob's root
  names = ("train", "validation", "test")
  assert inputs.file_split_name("validation-00000-of-00001.parquet", names) == "validation"
  assert inputs.file_split_name("wikitext-103/train/x.jsonl", names) == "train"
  assert inputs.file_split_name("training_notes.txt", names) is None
  assert inputs.file_split_name("sample/10BT/000_00000.parquet", names) is None
