"""Pre-training GPT-2 XL (1.5B) from scratch: the gpt2_small.py recipe at this size."""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "gpt2_small.py"))
  c.model.preset = "gpt2-xl"
  c.optimizer.lr = 2e-4
  c.model.remat = "full"  # activations of 48 blocks do not fit otherwise
  c.mesh.fsdp = 8  # shard params and optimizer state inside a host
  return c
