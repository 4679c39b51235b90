"""Makes the PEFT reference data of tests/test_lora_peft.py (tests/data/peft/, ~0.5 MB), in three stages:

  /work/refvenv/bin/python tests/make_peft_reference.py torch    # torch 2.13 CPU, transformers 5.25, peft 0.21.2
  python tests/make_peft_reference.py jax                         # this package's venv (no torch)
  /work/refvenv/bin/python tests/make_peft_reference.py peft_merge

1. torch: for each family a tiny Hugging Face model from a seed (GPT-2: 2 layers, width 32, vocabulary 128; Qwen3:
   2 layers, width 32, 4:2 heads of 16, MLP 64, untied head) saved as `<family>/base`; a PEFT LoraConfig(r=4,
   lora_alpha=8, lora_dropout=0.05, the family's target_modules) on it with every lora_A / lora_B weight drawn from
   a seeded N(0, 0.1^2) (PEFT's own init has B = 0, which would make every check trivial), saved by PEFT's
   save_pretrained as `<family>/peft_adapter`; `<family>/peft_reference.npz`: input ids, the PeftModel's logits
   (eval mode) and the weights of merge_and_unload() (HF names, HF layouts).
2. jax: our adapters for the same base (lora.init_adapters with a seed, B drawn non-zero), written by our exporter
   (peft.save_adapter) as `<family>/ours_adapter`.
3. peft_merge: PEFT loads `ours_adapter` on the base (PeftModel.from_pretrained) and merges it:
   `<family>/ours_merged_by_peft.npz` (HF names, HF layouts) and the PeftModel's logits.
"""

import json
import os
import sys
import zlib

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peft")
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
IDS_SEED, OURS_SEED = 7, 11


def _hf_model(family: str):
  import torch
  import transformers

  torch.manual_seed(0)
  if family == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)
  cfg = transformers.Qwen3Config(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      max_position_embeddings=32,
      tie_word_embeddings=False,
  )
  return transformers.Qwen3ForCausalLM(cfg)


def _ids():
  return np.random.default_rng(IDS_SEED).integers(0, 128, (2, 12)).astype(np.int64)


def _logits(model) -> np.ndarray:
  import torch

  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(_ids())).logits.numpy().astype(np.float32)


def _merged(peft_model) -> dict[str, np.ndarray]:
  """The adapted weights after merge_and_unload() (the others are the base's)."""
  merged = peft_model.merge_and_unload()
  return {k: v.detach().numpy().astype(np.float32) for k, v in merged.state_dict().items() if _adapted(k)}


def _adapted(name: str) -> bool:
  return name.endswith(".weight") and name.split(".")[-2] in sum(TARGETS.values(), [])


def stage_torch(family: str) -> None:
  import peft
  import torch
  import transformers

  out = os.path.join(DATA, family)
  base = _hf_model(family)
  base.save_pretrained(os.path.join(out, "base"))
  cfg = peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.05, target_modules=TARGETS[family], task_type="CAUSAL_LM", bias="none"
  )
  model = peft.get_peft_model(base, cfg)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
  model.save_pretrained(os.path.join(out, "peft_adapter"))
  logits = _logits(model)
  merged = _merged(model)
  np.savez(os.path.join(out, "peft_reference.npz"), input_ids=_ids(), logits=logits, **merged)
  # The saved adapter reproduces the model on a freshly loaded base.
  again = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base")), os.path.join(out, "peft_adapter")
  )
  np.testing.assert_array_equal(_logits(again), logits)


def our_adapter(family: str):
  """(model config, LoraSpec, adapters) of stage 2: our init with a seed, then B drawn non-zero."""
  import jax

  from dispersion_jax.interop import hf
  from dispersion_jax.models import lora

  model_cfg, params = hf.load_pretrained(os.path.join(DATA, family, "base"))
  spec = lora.LoraSpec(4, 8.0, 0.05, lora.select_targets(model_cfg, params, None))
  adapters = lora.init_adapters(spec, params, jax.random.PRNGKey(OURS_SEED))
  key = jax.random.PRNGKey(OURS_SEED + 1)
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1
      * jax.random.normal(jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(p).encode()) & 0x7FFFFFFF), x.shape)
      if p[-1].key == "b"
      else x,
      adapters,
  )
  return model_cfg, spec, adapters


def stage_jax(family: str) -> None:
  from dispersion_jax.interop import peft

  model_cfg, spec, adapters = our_adapter(family)
  peft.save_adapter(os.path.join(DATA, family, "ours_adapter"), model_cfg, spec, adapters)


def stage_peft_merge(family: str) -> None:
  import peft
  import transformers

  out = os.path.join(DATA, family)
  base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))
  model = peft.PeftModel.from_pretrained(base, os.path.join(out, "ours_adapter"))
  with open(os.path.join(out, "ours_adapter", "adapter_config.json")) as fh:
    assert json.load(fh)["fan_in_fan_out"] == (family == "gpt2")
  logits = _logits(model)
  np.savez(os.path.join(out, "ours_merged_by_peft.npz"), input_ids=_ids(), logits=logits, **_merged(model))


if __name__ == "__main__":
  stage = {"torch": stage_torch, "jax": stage_jax, "peft_merge": stage_peft_merge}[sys.argv[1]]
  for fam in TARGETS:
    stage(fam)
    print(f"{sys.argv[1]}: {fam} done")
