"""Pre-training GPT-2 small (124M) from scratch with the dispersion loss (angular_spread on all layers).

Hardware: one node of 8 x H100 (80 GB) or a v5e-16 slice, fully sharded (--config.mesh.data=1
--config.mesh.fsdp=-1). 512 x 1024 tokens per step do not fit in one pass there: grad_accum=auto splits the step
into the fewest micro-batches that fit (compile/auto_accum.py; the same optimizer step), and the output head +
CE run in chunks (ce_chunk, exact) instead of holding [B, L, 50257] float32 logits.
"""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "gpt2"
  c.model.scan_layers = True  # one compiled block: fast compiles at depth
  c.seq_len = 1024
  c.batch_size = 512  # sequences per step (global)
  c.grad_accum = "auto"  # the largest micro-batch that fits the devices (chosen before the first step, kept on resume)
  c.ce_chunk = 16384  # tokens per chunk of the fused output head + CE, over the micro-batch
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
