"""Build inputs: the formats (parquet / jsonl / txt files, a prepared TFDS dataset), wikitext grouping, split
names, and input errors (one line, naming the fix)."""

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from data_build_helpers import EOS, L, all_blocks, text_dir_cfg

from dispersion_jax.data import build as build_lib
from dispersion_jax.data import inputs, packed, readers
from dispersion_jax.data.config import DataConfig
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.errors import ConfigError, DataError

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
  cfg = text_dir_cfg(tmp_path, tmp_path, doc_grouping="wikitext")
  units = inputs.plan_units(cfg, inputs.describe_inputs(cfg))
  assert len(units) > 1 or unit_bytes > 100
  docs = [d for u in units for d in readers.unit_docs(u, "text", "wikitext")]
  assert [t.splitlines()[0] for _, t in docs] == [f" = {name} = " for name, _, _ in ARTICLES]
  for (_, text), (_, a, b) in zip(docs, ARTICLES):
    assert text == "".join(r or ("\n" if fmt == "txt" else "") for r in WIKI[a:b])
  if fmt == "parquet":
    assert [i for i, _ in docs] == [f"wiki.parquet:{a}" for _, a, _ in ARTICLES]
  rows = [d for u in units for d in readers.unit_docs(u, "text", "row")]
  assert len(rows) == sum(1 for r in WIKI if r.strip())


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
  val = all_blocks(packed.open_path(report.path), "validation").reshape(-1)
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
        ("bad.jsonl", b'{"text": "fine"}\n{"title": "no text"}\n', r"bad\.jsonl: line 2 \(byte 17\) .* 'text' string"),
    ],
)
def test_unreadable_inputs_name_the_file(tmp_path, name, content, match):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / name).write_bytes(content)
  _one_line_error(text_dir_cfg(tmp_path / "in", tmp_path / "c"), match)
  assert not (tmp_path / "c" / packed.DATASET_NAME).exists() or [
      p.name for p in (tmp_path / "c" / packed.DATASET_NAME).iterdir()
  ] == ["tokens"]


def test_empty_and_missing_inputs(tmp_path):
  (tmp_path / "none").mkdir()
  (tmp_path / "none" / "x.md").write_text("not an input")
  _one_line_error(text_dir_cfg(tmp_path / "none", tmp_path), "has no .parquet, .jsonl or .txt files")
  _one_line_error(text_dir_cfg(tmp_path / "absent", tmp_path), "does not exist; set --config.data.text_dir")
  _one_line_error(text_dir_cfg("", tmp_path), "needs data.text_dir")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "x.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
  (tmp_path / "blank" / "y.txt").write_text("\n\n")
  _one_line_error(text_dir_cfg(tmp_path / "blank", tmp_path), "has no non-empty documents")
  (tmp_path / "cols").mkdir()
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "cols" / "x.parquet")
  _one_line_error(
      text_dir_cfg(tmp_path / "cols", tmp_path), r"has no column 'text' \(columns: body\); set --config.data.text_key"
  )
  (tmp_path / "tiny").mkdir()
  for i in range(60):
    (tmp_path / "tiny" / f"{i}.txt").write_text("a b")
  _one_line_error(text_dir_cfg(tmp_path / "tiny", tmp_path), "fewer than one block of seq_len\\+1=1025", seq_len=1024)
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
