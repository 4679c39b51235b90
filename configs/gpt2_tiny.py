"""The demo: a ~7M-parameter GPT-2 (4 layers, width 128) on the embedded English corpus, ~5 minutes on 2 CPU cores."""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "tiny"
  c.model.n_layer = 4
  c.model.n_embd = 128
  c.model.n_head = 4
  c.model.n_positions = 128
  c.seq_len = 128
  c.batch_size = 16
  c.steps = 300
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.optimizer.lr = 1e-3
  c.optimizer.warmup = 0.1
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 0.1
  c.dispersion.loc = "all"
  return c
