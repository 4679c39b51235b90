"""The Qwen3 configuration: Hugging Face config.json spellings and defaults, the settings we refuse, the presets
(parameter counts, logical axes, FLOPs) and one-line config errors. The model itself: tests/test_qwen3.py."""

import dataclasses

import pytest

from dispersion_jax.interop.hf import config_from_hf
from dispersion_jax.models import Qwen3Config, count_params, flops_per_token, param_logical_axes, param_shapes, qwen3

# Qwen/Qwen3-0.6B's config.json as transformers 4.51 saved it (legacy top-level rope_theta, rope_scaling null).
QWEN3_0_6B_JSON = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_config_json_spellings_and_defaults():
  assert config_from_hf(QWEN3_0_6B_JSON) == Qwen3Config.preset("qwen3-0.6b")
  new = {k: v for k, v in QWEN3_0_6B_JSON.items() if k not in ("rope_theta", "rope_scaling")}
  new["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}  # transformers 5.x spelling
  assert config_from_hf(new).rope_theta == 5e5
  assert config_from_hf({**new, "rope_parameters": None}).rope_theta == 10000.0  # HF's default_theta
  # Keys left out take transformers' class defaults, not the 0.6B values.
  bare = config_from_hf({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4}, dtype="bfloat16")
  assert (bare.head_dim, bare.n_kv_head, bare.tie_embeddings, bare.dtype) == (128, 4, False, "bfloat16")


@pytest.mark.parametrize(
    "change, setting",
    [
        (dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
        (dict(layer_types=["full_attention"] * 27 + ["sliding_attention"]), "sliding_attention"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), "linear"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_key_value_heads=3), "n_kv_head"),
        (dict(model_type="llama"), "model_type"),
    ],
)
def test_unsupported_config_json_fails_with_one_line(change, setting):
  with pytest.raises(ValueError, match=setting) as e:
    config_from_hf({**QWEN3_0_6B_JSON, **change})
  assert "\n" not in str(e.value)


def test_preset_parameter_counts_and_axes():
  sizes = {
      "qwen3-0.6b": 596_049_920,
      "qwen3-1.7b": 1_720_574_976,
      "qwen3-4b": 4_022_468_096,
      "qwen3-8b": 8_190_735_360,
      "qwen3-width_256": 101_668_096,
  }
  for name, n in sizes.items():
    assert count_params(param_shapes(Qwen3Config.preset(name, scan_layers=True))) == n, name
  assert not Qwen3Config.preset("qwen3-width_768").tie_embeddings and Qwen3Config.preset("qwen3-4b").tie_embeddings
  axes = param_logical_axes(Qwen3Config.preset("test", scan_layers=True, tie_embeddings=False))
  assert tuple(axes["h"]["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads")
  assert tuple(axes["h"]["self_attn"]["o_proj"]["kernel"]) == ("layers", "heads", "embed")
  assert tuple(axes["h"]["self_attn"]["q_norm"]["scale"]) == ("layers", None)
  assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")
  assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")


def test_flops_count_the_head_once_and_attention_at_heads_times_head_dim():
  tied = Qwen3Config.preset("qwen3-0.6b", scan_layers=True)
  untied = dataclasses.replace(tied, tie_embeddings=False)
  # An untied model has one more V x D matrix, but its input embedding is a lookup: the same FLOPs.
  assert count_params(param_shapes(untied)) - count_params(param_shapes(tied)) == tied.vocab_size * tied.n_embd
  assert flops_per_token(untied, 1024) == flops_per_token(tied, 1024)
  assert flops_per_token(tied, 0) == 6 * count_params(param_shapes(tied))
  assert qwen3.attention_width(tied) == 2048 != tied.n_embd
  per_token = flops_per_token(tied, 2048) - flops_per_token(tied, 1024)
  assert per_token == flops_per_token(dataclasses.replace(tied, n_embd=512), 2048) - flops_per_token(
      dataclasses.replace(tied, n_embd=512), 1024
  )  # attention cost ignores the model width


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_head=6, n_kv_head=4), "n_kv_head"),
        (dict(head_dim=15), "head_dim"),
        (dict(remat="some"), "remat"),
        (dict(attention="flash"), "attention"),
        (dict(dropout=0.1), "dropout"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_errors_are_one_line(kw, field):
  with pytest.raises(ValueError, match=field) as e:
    Qwen3Config.preset("test", **kw)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="unknown model preset"):
    Qwen3Config.preset("qwen4")
  assert dataclasses.replace(Qwen3Config.preset("test"), scan_layers=True).scan_layers
