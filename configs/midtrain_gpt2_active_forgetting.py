"""The authors' GPT-2 mid-training baseline 'active_forgetting' (their *_other_counter_condensation.py): the
midtrain_gpt2.py recipe with CE only (dispersion.coeff 0) and active forgetting: after every 1000th optimizer step
the input embedding (and a tied head) is re-drawn from N(0, 0.02), its pad row 50256 (GPT-2: pad := eos) zeroed, its
Adam state reset; its own learning rate (peak 5e-5, 8% warm-up, the authors' step indexing). With fewer than 1000
steps no reset happens and their schedule keeps the embedding frozen: the run warns. One difference: for Qwen3 their
optimizer also decays the RMSNorm scales in this run only (their ALL_LAYERNORM_LAYERS holds only nn.LayerNorm); ours
never decays norm scales. See shared/docs/qwen3-and-baselines.md section 4.
"""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "midtrain_gpt2.py"))
  c.dispersion.coeff = 0.0
  c.baseline.method = "active_forgetting"
  return c
