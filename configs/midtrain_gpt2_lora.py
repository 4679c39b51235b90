"""The authors' GPT-2 mid-training recipe with `--lora` (lm_dispersion/midtrain_gpt2_huggingface/midtrain_gpt2.py):
midtrain_gpt2.py (angular_spread, coeff 0.1, lr 5e-5, 1,526 steps of 128 x 1024 tokens, clip 0.25 = their 1.0 on
summed micro-batch gradients) with LoRA adapters instead of full fine-tuning.

Follows their script: PEFT LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["c_attn", "c_proj",
"c_fc"]) = lora.rank 16, lora.alpha 32 (scale 2), lora.dropout 0.05 on the adapters' input during training, and
lora.targets None = GPT-2's default `/(c_attn|c_proj|c_fc)/kernel$`: the attention's qkv and output projections and
the MLP's two matrices of every block (PEFT matches "c_proj" in both attn and mlp). A as PEFT (kaiming-uniform),
B zero, so step 0 is the pretrained model. Only the adapters train; their HF Trainer applies weight decay 0.1 to
them as we do, and clips their gradient norm only (the frozen weights have none), as we do. Base weights stay
float32 as in their script (GPT-2 124M is small); the dispersion loss runs on the LoRA model's hidden states.

Export the adapters for `PeftModel.from_pretrained(GPT2LMHeadModel..., DIR)` with
`python -m dispersion_jax eval --workdir RUN --peft_export DIR` (--hf_export writes the merged model); start
from an adapter they trained with --config.lora.init_from=THEIR_ADAPTER_DIR.
"""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "midtrain_gpt2.py"))
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.lora.targets = None  # GPT-2's default: c_attn|c_proj|c_fc, their target_modules
  return c
