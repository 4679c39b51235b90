"""The paper's GPT-2 mid-training recipe, from a Hugging Face GPT-2 directory.

angular_spread on all layers, coeff 0.1, clamp 0.1, 256 sampled tokens; AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0; lr 5e-5 with cosine decay and 20% warm-up; 1024-token blocks; 131,072 tokens per step (128 x 1024);
200M tokens = 1,526 steps. Set the checkpoint with --config.init_from=/path/to/gpt2 (config.json +
model.safetensors) and the data with --config.data.source=text_dir --config.data.text_dir=DIR_OF_PARQUET
--config.data.doc_grouping=wikitext (the paper used wikitext-103; build it once with python -m
dispersion_jax.data.build --config configs/midtrain_gpt2.py ...); the default is the embedded corpus.

Against the authors' script (lm_dispersion/midtrain_gpt2_huggingface/midtrain_gpt2.py, see
shared/docs/qwen3-and-baselines.md 3.1): their README command runs 4 accumulation steps of 32 sequences, and their
Trainer SUMS micro-batch gradients, so their clip of 1.0 clips the mean gradient at 1/4: we average micro-batches
(coeff keeps its meaning at any grad_accum) and set clip 0.25, the exact equivalent, whatever our grad_accum.
lr 5e-5 is for one GPU (they scale it by sqrt(world size)).
"""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.init_from = "gpt2"  # a directory; override on the command line
  for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
    c.model[key] = None  # the shape comes from init_from/config.json
  c.seq_len = 1024
  c.batch_size = 128
  c.grad_accum = 8  # 16 sequences per micro-batch; raise batch per device where memory allows
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
  c.optimizer.clip = 0.25  # = their clip of 1.0 on the sum of their 4 micro-batch gradients
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 0.1
  c.dispersion.loc = "all"
  c.dispersion.tau_cos = 1.0
  c.dispersion.clamp_threshold = 0.1
  c.dispersion.max_tokens = 256
  return c
