"""LoRA training runs: resume is bit-exact (a scanned GPT-2 with dispersion, NEFTune, 2 micro-batches and adapter
dropout) and a vmapped sweep member trains as its own run; checkpoints hold the adapters, their moments, the data
position and a base fingerprint but no base weights; resuming on other base weights is one line and exit 2; a PEFT
adapter goes in through lora.init_from and comes out of `evaluate --peft_export` unchanged (and --hf_export writes
the merged model)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

pytestmark = pytest.mark.slow  # trains models

from test_lora_peft import DATA, _assert_same_adapter
from test_train_resume import losses

from dispersion_jax import config as config_lib
from dispersion_jax.cli import evaluate as cli_evaluate
from dispersion_jax.cli import train as cli_train
from dispersion_jax.interop import hf, peft
from dispersion_jax.models import GPTConfig, init_params, lora
from dispersion_jax.research import vmap_train
from dispersion_jax.training import saved_run, train
from dispersion_jax.training.checkpoint import Checkpointer

from conftest import REPO, TINY, tiny_cfg

ONE_DEVICE = ["--config.mesh.data=1"]


def _run_twice(cfg, tmp_path):
  """(losses straight through 4 steps, losses with a stop at 2 and a resume)."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  one = jax.devices()[:1]
  assert train.run(cfg, straight, devices=one) == 4
  assert train.run(cfg, resumed, devices=one, stop_at=2) == 2
  assert train.run(cfg, resumed, devices=one) == 4
  return losses(straight), losses(resumed), resumed


def test_gpt2_lora_with_dispersion_neftune_and_accumulation_resumes_bit_for_bit(tmp_path, data_dir):
  """Scanned layers with remat: the adapters carry the leading layer axis (Qwen3's LoRA step: test_lora.py)."""
  cfg = tiny_cfg(
      data_dir,
      *ONE_DEVICE,
      "--config.model.scan_layers=True",
      "--config.model.remat=full",
      "--config.steps=4",
      "--config.checkpoint_every=2",
      "--config.grad_accum=2",
      "--config.dispersion.max_tokens=16",
      "--config.baseline.method=neftune",
      "--config.baseline.with_dispersion=True",
      "--config.lora.rank=4",
      "--config.lora.alpha=8",
      "--config.lora.dropout=0.1",
  )
  a, b, workdir = _run_twice(cfg, tmp_path)
  assert sorted(a) == [1, 2, 3, 4] and a == b
  ckpt = Checkpointer(workdir, async_save=False)
  saved = traverse_util.flatten_dict(ckpt.manager.item_metadata(4)["state"]["params"])
  record, data_state = ckpt.lora(4), ckpt.data_state(4)
  ckpt.close()
  assert saved and all(p[-1] in ("a", "b") for p in saved)  # adapters only: no base weight is saved
  assert record["rank"] == 4 and record["alpha"] == 8.0 and len(record["targets"]) == 4  # stacked over layers
  assert set(record["base_fingerprint"]) == {"/".join(p) for p in traverse_util.flatten_dict(init_params(
      config_lib.model_config(cfg), jax.random.PRNGKey(0)))}  # fmt: skip
  assert data_state is not None
  _, model_cfg, state = saved_run.load_run(workdir)
  assert state.frozen is not None and jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)
  # A vmapped sweep of LoRA members (another seed beside this one) trains member 0 as its individual run.
  other = cfg.copy_and_resolve_references()
  other.seed = 1
  members = [str(tmp_path / "vmap0"), str(tmp_path / "vmap1")]
  assert vmap_train.run_group([cfg, other], members) == 4
  v = losses(members[0])
  np.testing.assert_allclose([v[k] for k in sorted(v)], [a[k] for k in sorted(a)], rtol=1e-5)
  assert losses(members[1]) != v


def _hf_base(path, seed: int) -> str:
  """A GPT-2 directory with the shape of tests/data/peft/gpt2/base but GPT-2's vocabulary (the run's tokenizer)."""
  cfg = GPTConfig(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  hf.save_pretrained(str(path), cfg, init_params(cfg, jax.random.PRNGKey(seed)))
  return str(path)


def _cli_flags(workdir, data_dir, base):
  return [
      "--config",
      os.path.join(REPO, "configs/gpt2_tiny.py"),
      "--workdir",
      workdir,
      *[f for f in TINY if not f.startswith("--config.model.")],
      *ONE_DEVICE,
      f"--config.data.data_dir={data_dir}",
      f"--config.init_from={base}",
      *[f"--config.model.{k}=None" for k in ("n_layer", "n_embd", "n_head", "n_positions")],  # init_from's shape
      "--config.steps=2",
      "--config.checkpoint_every=1",
  ]


def test_peft_adapter_in_through_init_from_and_out_through_peft_export_unchanged(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  base = _hf_base(tmp_path / "base", 0)
  adapter = os.path.join(DATA, "gpt2", "peft_adapter")
  flags = _cli_flags(workdir, data_dir, base)
  cfg = config_lib.load(flags[1], [f.removeprefix("--config.") for f in flags[4:]] + [f"lora.init_from={adapter}"])
  assert train.run(cfg, workdir, devices=jax.devices()[:1], stop_at=0) == 0  # a checkpoint of step 0
  out, merged_dir = str(tmp_path / "exported"), str(tmp_path / "merged")
  harness = ["--tasks", "example_cloze", "--limit", "2", "--bootstrap_iters", "0"]  # a LoRA run evaluates, too
  cli_evaluate.main(["--workdir", workdir, "--peft_export", out, "--hf_export", merged_dir, *harness])
  assert "wrote PEFT adapter directory" in capsys.readouterr().out
  _assert_same_adapter(adapter, out)
  with open(os.path.join(out, peft.CONFIG)) as fh:
    assert json.load(fh)["base_model_name_or_path"] == base
  # --hf_export: the merged model, W + A @ B * alpha / r of the adapter on the base
  model_cfg, params = hf.load_pretrained(base)
  spec, adapters = peft.load_adapter(adapter, model_cfg)
  want = hf.to_hf_state_dict(model_cfg, lora.merge(params, adapters, spec.scale))
  got = hf.read_safetensors(merged_dir)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resuming_on_other_base_weights_is_one_line_and_exit_2(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  first = _cli_flags(workdir, data_dir, _hf_base(tmp_path / "base", 0)) + ["--config.lora.rank=2"]
  cfg = config_lib.load(first[1], [f.removeprefix("--config.") for f in first[4:]] + ["steps=1"])
  assert train.run(cfg, workdir, devices=jax.devices()[:1]) == 1
  capsys.readouterr()
  # Other weights at the same init_from path: a changed init_from alone is refused earlier, as config drift.
  other = _cli_flags(workdir, data_dir, _hf_base(tmp_path / "base", 1)) + ["--config.lora.rank=2"]
  with pytest.raises(SystemExit) as e:  # the command line, on all 8 devices: the check is before any compile
    cli_train.main([f for f in other if f not in ONE_DEVICE])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err
  assert err.startswith("error: the base weights differ from those checkpoint") and "use a new --workdir" in err
  with pytest.raises(SystemExit) as e:  # and without LoRA, the LoRA checkpoint is refused just as plainly
    cli_train.main([f for f in _cli_flags(workdir, data_dir, str(tmp_path / "base")) if f not in ONE_DEVICE])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err and "lora" in err
