"""Makes a Hugging Face `tokenizer.json` of the Qwen tokenizer from its tiktoken file, offline, and checks it.

  pip download --no-deps dashscope==2.0.2 && unzip -j dashscope-2.0.2-*.whl dashscope/resources/qwen.tiktoken
  python docs/benchmarks/qwen_tokenizer.py qwen.tiktoken OUT_DIR     # OUT_DIR/tokenizer.json

Why: the data-build benchmark (bench_beam_build.py) measures tokens/s with a Qwen3 tokenizer, and none is available
offline here. Qwen3 uses Qwen's tokenizer, byte-level BPE with 151,643 regular tokens (Qwen3 technical report,
section 2; the Qwen2 report says the same of Qwen2), which Alibaba's `dashscope` package ships as `qwen.tiktoken`
with its pre-tokenizer pattern. This script turns the ranks into BPE merges (the conversion transformers'
`TikTokenConverter` does), writes the pattern and byte-level steps as a Qwen tokenizer.json has them, adds
`<|endoftext|>` (id 151643, Qwen's EOS) and then **checks** the result: on the embedded corpus its ids must equal
tiktoken's with the same ranks and pattern, document by document, or the script fails. What the rate then measures
is the `tokenizers` route a real Qwen3 tokenizer.json takes, with Qwen's vocabulary and pattern (Qwen3's extra chat
special tokens do not occur in plain text).
"""

import base64
import json
import os
import sys

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EOS, EOS_ID = "<|endoftext|>", 151643


def _byte_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(keep, chars)}


def load_ranks(path: str) -> dict[bytes, int]:
  with open(path, "rb") as fh:
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in fh.read().splitlines() if line)}


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
  to_str = _byte_unicode()

  def text(b: bytes) -> str:
    return "".join(to_str[x] for x in b)

  merges = []
  for token, rank in ranks.items():
    pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    merges += [(rank, ranks[a], ranks[b], a, b) for a, b in pairs]
  merges.sort()
  vocab = {text(t): r for t, r in ranks.items()}
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": [
          {"id": EOS_ID, "content": EOS, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
           "special": True}
      ],
      "normalizer": None,
      "pre_tokenizer": {
          "type": "Sequence",
          "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
          ],
      },
      "post_processor": None,
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
      "model": {
          "type": "BPE",
          "dropout": None,
          "unk_token": None,
          "continuing_subword_prefix": None,
          "end_of_word_suffix": None,
          "fuse_unk": False,
          "byte_fallback": False,
          "ignore_merges": False,
          "vocab": vocab,
          "merges": [[text(a), text(b)] for _, _, _, a, b in merges],
      },
  }


def check(ranks: dict[bytes, int], out_dir: str) -> int:
  """Encodes the embedded corpus with the written tokenizer.json and with tiktoken; returns the tokens compared."""
  import tiktoken  # noqa: PLC0415
  import tokenizers  # noqa: PLC0415

  from dispersion_jax.data import corpus  # noqa: PLC0415

  ref = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={EOS: EOS_ID})
  hf = tokenizers.Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
  texts = [t for _, t in corpus.default_docs() if t.strip()]
  n = 0
  for i, (want, got) in enumerate(zip(ref.encode_ordinary_batch(texts), hf.encode_batch(texts, add_special_tokens=False))):
    if want != got.ids:
      raise SystemExit(f"document {i}: tokenizer.json gives other ids than tiktoken; the conversion is wrong")
    n += len(want)
  return n


def main(src: str, out_dir: str) -> None:
  ranks = load_ranks(src)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tokenizer.json"), "w") as fh:
    json.dump(tokenizer_json(ranks), fh, ensure_ascii=False)
  n = check(ranks, out_dir)
  print(f"{out_dir}/tokenizer.json: {len(ranks):,} BPE tokens + {EOS}; equal to tiktoken on {n:,} tokens of text")


if __name__ == "__main__":
  main(*sys.argv[1:3])
