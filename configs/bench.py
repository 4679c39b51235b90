"""The benchmark's default point (python -m dispersion_jax bench): a 6-layer, 384-wide GPT-2 with the full GPT-2
vocabulary, 8 x 256 tokens, angular_spread on all layers and all tokens, coeff 0.1, clamp 0.1 (the GPT-2
training script's values). Override anything with --config.KEY=VALUE; comma-separated values are crossed."""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "gpt2"
  c.model.n_layer = 6
  c.model.n_embd = 384
  c.model.n_head = 6
  c.seq_len = 256
  c.batch_size = 8
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 0.1
  c.dispersion.clamp_threshold = 0.1
  c.dispersion.loc = "all"
  c.dispersion.max_tokens = None
  return c
