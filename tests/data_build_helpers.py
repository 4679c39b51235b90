"""Helpers of the data-build tests (test_data_build*.py; their input tree is the `mixed` fixture of conftest.py)."""

import numpy as np

from dispersion_jax.data import packed
from dispersion_jax.data.config import DataConfig

EOS = 50256
L = 16
WORDS = "alpha beta gamma delta river stone light garden silver morning quiet north".split()


def random_text(i: int, rng) -> str:
  return f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + "."


def text_dir_cfg(text_dir, cache, **kw) -> DataConfig:
  return DataConfig(source="text_dir", text_dir=str(text_dir), cache_dir=str(cache), **kw)


def all_blocks(ds: packed.PackedDataset, split: str) -> np.ndarray:
  tokens, _ = ds.read(split, range(ds.num_blocks(split)))
  return tokens
