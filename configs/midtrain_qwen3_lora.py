"""The authors' Qwen3 mid-training recipe with `--lora` (lm_dispersion/midtrain_qwen3_huggingface/midtrain_qwen3.py):
midtrain_qwen3.py (angular_spread over all layers, coeff 1.0, 4096-token blocks, 32 sequences per step, lr 5e-5,
clip 1/32 = their 1.0 on summed micro-batch gradients, remat full) with LoRA adapters instead of full fine-tuning.
For Qwen3-1.7B to 8B on one accelerator: full AdamW state for 8B parameters is ~96 GiB before activations.

Follows their script: r 16, lora_alpha 32 (scale 2), lora_dropout 0.05 (on the adapters' input, training only),
A as PEFT (kaiming-uniform), B zero; weight decay and clipping on the adapters only, as their HF Trainer does.
Differs from it:
- Targets. Their Qwen3 script passes GPT-2's module names (c_attn, c_proj, c_fc), which no Qwen3 module has:
  PEFT 0.21.2 stops with NoMatchingPeftModuleError ("Target modules {...} not found in the base model", checked
  on a Qwen3 model), so their --lora could not have run on Qwen3.
  We adapt every attention and MLP projection (lora.targets None = Qwen3's default
  `/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$`), the counterpart of their GPT-2 choice
  (all of a block's matrices); PEFT's own default for Qwen3 would be q_proj and v_proj only
  (--config.lora.targets='(q_proj|v_proj)/kernel$').
- Base weights in bfloat16 (model.param_dtype): they keep float32 weights under bf16 autocast. The matmuls run in
  bf16 either way; holding the frozen base in bf16 halves its memory (8B: 15 instead of 30 GiB). Set
  --config.model.param_dtype=float32 for their precision.
Export: python -m dispersion_jax eval --workdir RUN --peft_export DIR (PeftModel.from_pretrained on
Qwen3ForCausalLM; fan_in_fan_out false), --hf_export for the merged model.
"""

import os

from dispersion_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "midtrain_qwen3.py"))
  c.model.param_dtype = "bfloat16"  # the frozen base; the adapters and their moments are float32
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.lora.targets = None  # Qwen3's default: all attention and MLP projections (their script's names match nothing)
  return c
