"""PEFT interchange against reference data made with torch 2.13 + transformers 5.25 + peft 0.21.2
(tests/make_peft_reference.py; read here without torch): a PEFT adapter loads (lora.init_from) and merges to
PEFT's merge_and_unload() weights and runs to PeftModel's logits; our export (--peft_export) is what PEFT loaded
and merged to our weights; a PEFT adapter round-trips unchanged through our format. Both families, scanned or not."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from dispersion_jax.interop import hf, peft
from dispersion_jax.models import build_model, lora

DATA = os.path.join(os.path.dirname(__file__), "data", "peft")
CASES = [(f, scan) for f in ("gpt2", "qwen3") for scan in (False, True)]
SETTINGS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias")


def _load(family, scan, adapter):
  model_cfg, params = hf.load_pretrained(os.path.join(DATA, family, "base"), scan_layers=scan)
  spec, adapters = peft.load_adapter(os.path.join(DATA, family, adapter), model_cfg)
  assert lora.resolve(lora.LoraConfig(init_from="x"), model_cfg, params, (spec, adapters)) == spec
  return model_cfg, params, spec, adapters


def _check_against(ref: dict, model_cfg, params, spec, adapters) -> None:
  merged = hf.to_hf_state_dict(model_cfg, lora.merge(params, adapters, spec.scale))
  names = [k for k in ref if k not in ("input_ids", "logits")]
  assert len(names) == len(spec.targets) * (1 if spec.targets[0][0].startswith("h_") else model_cfg.n_layer)
  for k in names:
    np.testing.assert_allclose(merged[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
  base = hf.to_hf_state_dict(model_cfg, params)
  assert all(np.abs(base[k] - ref[k]).max() > 1e-3 for k in names)  # the adapters changed every target
  variables = {"params": params, "lora": lora.scaled(adapters, spec.scale)}
  logits = jax.jit(build_model(model_cfg).apply)(variables, ref["input_ids"].astype(np.int32))
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family,scan", CASES)
def test_a_peft_adapter_merges_to_peft_weights_and_runs_to_peft_logits(family, scan):
  model_cfg, params, spec, adapters = _load(family, scan, "peft_adapter")
  assert (spec.rank, spec.alpha, spec.dropout) == (4, 8.0, 0.05)
  assert {t[-1] for t in spec.targets} == {"gpt2": {"c_attn", "c_proj", "c_fc"}, "qwen3": {"q_proj", "k_proj",
      "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[family]  # fmt: skip
  _check_against(dict(np.load(os.path.join(DATA, family, "peft_reference.npz"))), model_cfg, params, spec, adapters)


@pytest.mark.parametrize("family,scan", CASES)
def test_a_peft_adapter_round_trips_unchanged(family, scan, tmp_path):
  model_cfg, _, spec, adapters = _load(family, scan, "peft_adapter")
  peft.save_adapter(str(tmp_path), model_cfg, spec, adapters)
  _assert_same_adapter(os.path.join(DATA, family, "peft_adapter"), str(tmp_path))


def _assert_same_adapter(want_dir: str, got_dir: str) -> None:
  want, got = load_file(os.path.join(want_dir, peft.WEIGHTS)), load_file(os.path.join(got_dir, peft.WEIGHTS))
  assert sorted(want) == sorted(got)
  for k in want:
    assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k
  with open(os.path.join(want_dir, peft.CONFIG)) as a, open(os.path.join(got_dir, peft.CONFIG)) as b:
    ca, cb = json.load(a), json.load(b)
  assert {k: ca[k] for k in SETTINGS} == {k: cb[k] for k in SETTINGS}
  assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_our_export_is_what_peft_loaded_and_peft_merges_it_to_our_weights(family, tmp_path):
  """tests/data/peft/<family>/ours_adapter was written by peft.save_adapter and loaded by PeftModel; today's
  exporter writes the same bytes, and PEFT's merge / logits of it equal ours."""
  from make_peft_reference import our_adapter

  model_cfg, spec, adapters = our_adapter(family)
  peft.save_adapter(str(tmp_path), model_cfg, spec, adapters)
  _assert_same_adapter(os.path.join(DATA, family, "ours_adapter"), str(tmp_path))
  with open(os.path.join(tmp_path, peft.CONFIG)) as fh:
    assert json.load(fh)["fan_in_fan_out"] == (family == "gpt2")  # Conv1D vs nn.Linear
  _, params = hf.load_pretrained(os.path.join(DATA, family, "base"))
  ref = dict(np.load(os.path.join(DATA, family, "ours_merged_by_peft.npz")))
  _check_against(ref, model_cfg, params, spec, adapters)


def test_target_modules_name_the_layers_exactly():
  model_cfg, _ = hf.load_pretrained(os.path.join(DATA, "gpt2", "base"))
  all_attn = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
  assert peft.target_modules(model_cfg, all_attn) == all_attn  # "c_proj" would also adapt mlp.c_proj
  both = all_attn + ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
  assert peft.target_modules(model_cfg, both) == ["c_proj"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(use_dora=True), "use_dora=True is not supported"),
        (lambda c: c.update(peft_type="IA3"), "only LORA adapters"),
        (lambda c: c.update(r=8), r"needs lora_A \[r=8, in\]"),
    ],
)
def test_unsupported_or_inconsistent_adapters_are_one_line_errors(edit, message, tmp_path):
  src = os.path.join(DATA, "gpt2", "peft_adapter")
  with open(os.path.join(src, peft.CONFIG)) as fh:
    c = json.load(fh)
  edit(c)
  with open(tmp_path / peft.CONFIG, "w") as fh:
    json.dump(c, fh)
  os.symlink(os.path.join(src, peft.WEIGHTS), tmp_path / peft.WEIGHTS)
  model_cfg, _ = hf.load_pretrained(os.path.join(DATA, "gpt2", "base"))
  with pytest.raises(ValueError, match=message) as e:
    peft.load_adapter(str(tmp_path), model_cfg)
  assert "\n" not in str(e.value)


def test_an_adapter_for_another_model_is_refused():
  qwen_cfg, qwen_params = hf.load_pretrained(os.path.join(DATA, "qwen3", "base"))
  with pytest.raises(ValueError, match="not a LoRA weight of a dense layer of this model"):
    peft.load_adapter(os.path.join(DATA, "gpt2", "peft_adapter"), qwen_cfg)
  spec, adapters = peft.load_adapter(os.path.join(DATA, "qwen3", "peft_adapter"), qwen_cfg)
  with pytest.raises(ValueError, match="lora.rank=8 but the adapter"):
    lora.resolve(lora.LoraConfig(rank=8, init_from="x"), qwen_cfg, qwen_params, (spec, adapters))
  with pytest.raises(ValueError, match="selects other layers"):
    lora.resolve(lora.LoraConfig(targets="q_proj", init_from="x"), qwen_cfg, qwen_params, (spec, adapters))


def test_peft_loads_our_export_when_torch_is_here(tmp_path):
  """Where torch + peft are installed (not in CI): PeftModel.from_pretrained on our export, merged, equals ours."""
  peft_lib = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  from make_peft_reference import our_adapter

  model_cfg, spec, adapters = our_adapter("qwen3")
  peft.save_adapter(str(tmp_path), model_cfg, spec, adapters)
  base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "qwen3", "base"))
  merged = peft_lib.PeftModel.from_pretrained(base, str(tmp_path)).merge_and_unload().state_dict()
  _, params = hf.load_pretrained(os.path.join(DATA, "qwen3", "base"))
  ours = hf.to_hf_state_dict(model_cfg, lora.merge(params, adapters, spec.scale))
  for k, v in ours.items():
    np.testing.assert_allclose(merged[k].numpy(), v, rtol=1e-6, atol=1e-7, err_msg=k)
