"""The authors' TorchTitan Qwen3 pre-training recipe (their fork, configs/final/qwen_test_dispersion.toml) at the
width_256 flavour; --config.model.preset=qwen3-width_512 / qwen3-width_768 for the other two.

As their fork runs it (shared/docs/qwen3-and-baselines.md sections 2.2 and 3.2), and where we differ:
- Dispersion on the RAW output of every block (forward hooks on model.layers): no embedding output, no final norm
  (dispersion.final_norm=False); angular_spread, coeff 1.0, tau 1.0, 256 sampled tokens; their older loss clamps
  cosines at 1 - epsilon = 0.99 (clamp_threshold 0.01) with epsilon 1e-2.
- Untied embedding and head (the fork's tying is lost after FSDP wrapping; its HF export writes both).
- fineweb_edu, 4096-token blocks, 128 sequences per step (4 per device x 16 accumulation x 2 replicas), 2,480 steps
  (~1.3B tokens); AdamW lr 3e-4, (0.9, 0.95), eps 1e-8, wd 0.1, 100 warm-up steps, cosine to 0.1x, clip 1.0. Their
  loss divides by the accumulation count (a proper mean), as we do: no clip rescaling here.
- Precision: they build the parameters in bf16; we keep float32 parameters with bf16 compute (model.dtype auto).
  Activation checkpointing: theirs is selective per op; remat "dots" keeps matmul outputs.
- Init: Hugging Face's (N(0, 0.02)); theirs draws the token embedding from N(0, 1) and depth-scales wo/w2/w3.
- Data: --config.data.source=text_dir --config.data.text_dir=FINEWEB_EDU_PARQUET_DIR, built once with
  python -m dispersion_jax data-build --config configs/pretrain_qwen3.py [...]. Tokenizer: a Qwen tokenizer
  directory (--config.tokenizer=DIR).
"""

from dispersion_jax.config import default_config


def get_config():
  c = default_config()
  c.model.family = "qwen3"
  c.model.preset = "qwen3-width_256"
  c.model.remat = "dots"
  c.model.scan_layers = True  # 28 identical blocks: one compiled block
  c.tokenizer = "Qwen/Qwen3-0.6B"  # a local HF tokenizer directory; override on the command line
  c.seq_len = 4096
  # The output head + CE in chunks (losses/fused_ce.py, exact): the [B, L, 151936] float32 logits, their bf16 copy
  # and their gradient were 7 of the 8.8 GiB of temporaries per v5e chip at Qwen3-0.6B, batch 4 x 2048 per chip.
  c.ce_chunk = 4096
  c.batch_size = 128
  c.grad_accum = 16
  c.steps = 2480
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 16
  c.checkpoint_every = 250
  c.optimizer.lr = 3e-4
  c.optimizer.warmup = 100
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip = 1.0
  c.dispersion.variant = "angular_spread"
  c.dispersion.coeff = 1.0
  c.dispersion.loc = "all"
  c.dispersion.tau_cos = 1.0
  c.dispersion.epsilon = 1e-2
  c.dispersion.clamp_threshold = 0.01
  c.dispersion.max_tokens = 256
  c.dispersion.final_norm = False
  c.mesh.data = -1
  return c
