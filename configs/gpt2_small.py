"""Pre-training GPT-2 small (124M) from scratch with the dispersion loss (angular_spread on all layers)."""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "gpt2"
  c.model.scan_layers = True  # one compiled block: fast compiles at depth
  c.seq_len = 1024
  c.batch_size = 512  # sequences per step (global)
  c.steps = 100_000
  c.log_every = 50
  c.eval_every = 2000
  c.eval_batches = 16
  c.checkpoint_every = 2000
  c.optimizer.lr = 6e-4
  c.optimizer.warmup = 2000
  c.optimizer.weight_decay = 0.1
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 0.1
  c.dispersion.loc = "all"
  c.mesh.data = -1
  return c
