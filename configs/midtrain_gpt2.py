"""The paper's GPT-2 mid-training recipe, from a Hugging Face GPT-2 directory.

angular_spread on all layers, coeff 0.1, clamp 0.1, 256 sampled tokens; AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0; lr 5e-5 with cosine decay and 20% warm-up; 1024-token blocks; 131,072 tokens per step (128 x 1024);
200M tokens = 1,526 steps. Set the checkpoint with --config.init_from=/path/to/gpt2 (config.json +
model.safetensors) and the data with --config.data.source=tfds --config.data.tfds_name=... (the paper used
wikitext-103) or --config.data.source=text_dir --config.data.text_dir=...; the default is the embedded corpus.
"""
from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.init_from = "gpt2"                # a directory; override on the command line
  for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
    c.model[key] = None               # the shape comes from init_from/config.json
  c.seq_len = 1024
  c.batch_size = 128
  c.grad_accum = 8                    # 16 sequences per micro-batch; raise batch per device where memory allows
  c.steps = 1526
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 16
  c.checkpoint_every = 200
  c.optimizer.lr = 5e-5
  c.optimizer.warmup = 0.2
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip = 1.0
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 0.1
  c.dispersion.loc = "all"
  c.dispersion.tau_cos = 1.0
  c.dispersion.clamp_threshold = 0.1
  c.dispersion.max_tokens = 256
  return c
