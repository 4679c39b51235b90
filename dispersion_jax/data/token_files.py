"""Stage A worker of a build: one work unit -> its token files per split (tokens with EOS after each document, and
the document lengths) and its stats file, written last: its presence marks the unit as done.

HOLD_ENV (tests only): a folder. Each work unit then announces itself there (a file named after the worker's pid)
and never finishes, so an interruption test signals a build that is certainly still tokenizing, however fast or
busy the machine (tests/test_build_interrupts.py). Unset, as everywhere else, it costs one lookup per unit.
"""

import json
import os
import time

import numpy as np

from dispersion_jax.data import corpus, readers
from dispersion_jax.data import tokenizer as tokenizer_lib
from dispersion_jax.data.inputs import SPLITS, TRAIN, VALIDATION, Unit

_ENCODE_DOCS, _ENCODE_CHARS = 512, 4 << 20  # documents / characters per tokenizer call


def unit_file(token_dir: str, index: int, split: str, what: str) -> str:
  """`what`: "tok" (token ids) or "len" (document lengths, EOS included)."""
  return os.path.join(token_dir, f"u{index:06d}.{split}.{what}.npy")


def unit_stats_file(token_dir: str, index: int) -> str:
  return os.path.join(token_dir, f"u{index:06d}.json")


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


HOLD_ENV = "DISPERSION_BUILD_TEST_HOLD"


def _hold_if_testing() -> None:
  folder = os.environ.get(HOLD_ENV)
  if not folder:
    return
  with open(os.path.join(folder, str(os.getpid())), "w"):
    pass
  while True:  # until the build stops this worker (SIGKILL) or its lifeline ends it
    time.sleep(60)


def tokenize_unit(task: dict) -> dict:
  """Tokenizes one unit into its token files; returns (and writes, last) its stats. Runs in a worker process."""
  _hold_if_testing()
  unit: Unit = task["unit"]
  index, token_dir, dtype = task["index"], task["token_dir"], np.dtype(task["dtype"])
  tok = tokenizer_lib.get_tokenizer(task["tokenizer"])
  eos = tok.eos_id
  out = {s: {"tokens": [], "lens": []} for s in SPLITS}
  extreme = {TRAIN: None, VALIDATION: None}  # hash-split units: (hash, index) of the min train / max val doc
  count = {s: 0 for s in SPLITS}

  def encode(chunk: list[tuple[str, str, float]]):
    texts = [t for _, t, _ in chunk]
    ids = tok.encode_batch(texts) if task["threads"] else [tok.encode(t) for t in texts]
    for (split, _, h), doc in zip(chunk, ids):
      flat = out[split]
      flat["tokens"].append(np.asarray(doc + [eos], dtype=dtype))
      flat["lens"].append(len(doc) + 1)
      if h is not None:
        best = extreme[split]
        if best is None or (h < best[0] if split == TRAIN else h > best[0]):
          extreme[split] = (h, count[split])
      count[split] += 1

  docs = readers.unit_docs(unit, task["text_key"], task["grouping"])
  chunk, chars = [], 0
  for doc_id, text in docs:
    if unit.split is None:
      h = corpus.doc_hash(doc_id)
      split = VALIDATION if h < corpus.VALIDATION_FRACTION else TRAIN
    else:
      h, split = None, unit.split
    chunk.append((split, text, h))
    chars += len(text)
    if len(chunk) >= _ENCODE_DOCS or chars >= _ENCODE_CHARS:
      encode(chunk)
      chunk, chars = [], 0
  if chunk:
    encode(chunk)
  stats = {
      "unit": index,
      "hashed": unit.split is None,
      "docs": {},
      "tokens": {},
      "min_train": extreme[TRAIN],
      "max_validation": extreme[VALIDATION],
  }
  for split in SPLITS:
    tokens = np.concatenate(out[split]["tokens"]) if out[split]["tokens"] else np.zeros(0, dtype)
    _save_npy(unit_file(token_dir, index, split, "tok"), tokens)
    _save_npy(unit_file(token_dir, index, split, "len"), np.asarray(out[split]["lens"], dtype=np.int64))
    stats["docs"][split], stats["tokens"][split] = count[split], int(tokens.size)
  path = unit_stats_file(token_dir, index)
  with open(f"{path}.tmp{os.getpid()}", "w") as fh:
    json.dump(stats, fh)
  os.replace(f"{path}.tmp{os.getpid()}", path)  # last: its presence marks the unit as done
  return stats
