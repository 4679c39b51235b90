"""Pre-training GPT-2 medium (355M) from scratch: the gpt2_small.py recipe at this size."""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "gpt2_small.py"))
  c.model.preset = "gpt2-medium"
  c.optimizer.lr = 3e-4
  return c
