"""The authors' Qwen3 mid-training recipe (lm_dispersion/midtrain_qwen3_huggingface/midtrain_qwen3.py), from a
Hugging Face Qwen3 directory: --config.init_from=/path/to/Qwen3-0.6B (config.json + safetensors + tokenizer).

Setting by setting as their script runs it (shared/docs/qwen3-and-baselines.md section 3.1), and where we differ:
- angular_spread over hidden_states[1..N] (the last after the final norm: dispersion.final_norm=True), tau_cos 1,
  epsilon 1e-2, 256 sampled tokens per layer. clamp_threshold 0.25: their Qwen3 script passes none, so the loss's
  default applies (their GPT-2 script sets 0.1). coeff 1.0 is their command-line default (the paper's value is not
  in their repository); sweep it.
- 4096-token blocks, 32 sequences per optimizer step (per-device batch 1 x 32 accumulation steps on one GPU:
  131,072 tokens/step). 200M training tokens = 1,526 steps, as the GPT-2 recipe (their token budget is a flag).
- AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1 (not on norm scales, as the HF Trainer), lr 5e-5 (x sqrt(world
  size) in their script: scale optimizer.lr yourself on several GPUs), cosine to 0, 20% warm-up.
- Gradient accumulation: their Trainer SUMS the 32 micro-batch gradients (their compute_loss returns a per-micro-
  batch mean and the Trainer does not divide by the accumulation count), so their global-norm clip at 1.0 clips
  the mean gradient at 1/32. We average micro-batches (coeff keeps its meaning at any grad_accum); clip 1.0/32 is
  the exact equivalent of their run, set below. AdamW itself does not see the difference.
- Precision: they train float32 weights under bf16 autocast with gradient checkpointing: model.dtype auto (bf16 on
  GPU), float32 params, remat full.
- Data: wikitext-103 as 4096-token blocks, no separators between articles. Here: --config.data.source=text_dir
  --config.data.text_dir=DIR_OF_PARQUET --config.data.doc_grouping=wikitext (articles at their = Title = lines;
  we do put EOS between documents, which their concatenation does not).
"""

from dispersion_jax.config import default_config

GRAD_ACCUM = 32


def get_config():
  c = default_config()
  c.init_from = "Qwen/Qwen3-0.6B"  # a local directory; override on the command line
  c.tokenizer = c.get_ref("init_from")  # the checkpoint's own tokenizer files: follows --config.init_from
  c.model.family = "qwen3"  # informational: with init_from the shape comes from its config.json
  c.model.remat = "full"
  c.seq_len = 4096
  c.batch_size = 32
  c.grad_accum = GRAD_ACCUM
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
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip = 1.0 / GRAD_ACCUM  # = their clip of 1.0 on the summed micro-batch gradients
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 1.0
  c.dispersion.loc = "all"
  c.dispersion.tau_cos = 1.0
  c.dispersion.epsilon = 1e-2
  c.dispersion.clamp_threshold = 0.25
  c.dispersion.max_tokens = 256
  c.dispersion.final_norm = True
  return c
