"""Pre-training GPT-2 large (774M) from scratch: the gpt2_small.py recipe at this size."""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "gpt2_small.py"))
  c.model.preset = "gpt2-large"
  c.optimizer.lr = 2.5e-4
  c.model.remat = "dots"  # keep matmul outputs, recompute the rest
  return c
