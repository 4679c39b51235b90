"""The authors' GPT-2 mid-training baseline 'neftune' (their *_other_counter_condensation.py): the midtrain_gpt2.py
recipe with CE only (dispersion.coeff 0) and NEFTune-style noise on the token-embedding output, alpha 1.0 (the
family's default; uniform in +-alpha / sqrt(seq_len * width), training steps only, fresh per micro-batch). See
shared/docs/qwen3-and-baselines.md section 4.
"""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "midtrain_gpt2.py"))
  c.dispersion.coeff = 0.0
  c.baseline.method = "neftune"
  return c
