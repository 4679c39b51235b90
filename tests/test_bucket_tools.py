"""The tools that read or write a run work on a bucket (gs://, a GCS emulator on loopback) as on a local disk: a
LoRA run whose base (init_from) and adapter (lora.init_from) live in the bucket trains into a bucket workdir;
`eval` reads it from there and writes --peft_export, --hf_export and --output_path into the bucket, exactly what
the same tools write locally; `generate` reads it too; a path with a scheme no tool can honour is one line."""

import json
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models

from test_lora_peft import DATA, _assert_same_adapter
from test_lora_train import _cli_flags, _hf_base

from dispersion_jax import config as config_lib
from dispersion_jax.cli import evaluate as cli_evaluate
from dispersion_jax.cli import generate as cli_generate
from dispersion_jax.interop import hf, peft
from dispersion_jax.models import lora
from dispersion_jax.storage import paths, transfer
from dispersion_jax.training import train


def test_a_lora_run_from_a_bucket_into_a_bucket_evaluates_exports_and_generates_there(gcs, tmp_path, data_dir, capsys):
  base_local = _hf_base(tmp_path / "base", 0)
  adapter_local = os.path.join(DATA, "gpt2", "peft_adapter")
  base, adapter, workdir = gcs.prefix("base"), gcs.prefix("adapter"), gcs.prefix("lora-run")
  transfer.upload_dir(base_local, base)
  transfer.upload_dir(adapter_local, adapter)

  flags = _cli_flags(workdir, data_dir, base)
  cfg = config_lib.load(flags[1], [f.removeprefix("--config.") for f in flags[4:]] + [f"lora.init_from={adapter}"])
  assert train.run(cfg, workdir, devices=jax.devices()[:1], stop_at=0) == 0  # a checkpoint of step 0, in the bucket

  exported, merged, results = gcs.prefix("peft"), gcs.prefix("merged"), gcs.prefix("eval") + "/out.json"
  harness = ["--tasks", "example_cloze", "--limit", "2", "--bootstrap_iters", "0"]
  out = ["--peft_export", exported, "--hf_export", merged, "--output_path", results]
  cli_evaluate.main(["--workdir", workdir, *out, *harness])
  assert "wrote PEFT adapter directory" in capsys.readouterr().out

  with transfer.local_dir(exported) as got:  # the adapter that went in through lora.init_from, unchanged
    _assert_same_adapter(adapter_local, got)
    with open(os.path.join(got, peft.CONFIG)) as fh:
      assert json.load(fh)["base_model_name_or_path"] == base
  model_cfg, params = hf.load_pretrained(base)  # --hf_export: the merged model
  spec, adapters = peft.load_adapter(adapter, model_cfg)
  want = hf.to_hf_state_dict(model_cfg, lora.merge(params, adapters, spec.scale))
  with transfer.local_dir(merged) as local_merged:
    got = hf.read_safetensors(local_merged)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  report = json.loads(paths.path(results).read_text())
  assert report["model"]["source"] == workdir and "example_cloze" in report["results"]

  texts = cli_generate.run(cli_generate.parse_args(["--workdir", workdir, "--prompt", "The", "--max_new_tokens", "3"]))
  assert len(texts) == 1 and isinstance(texts[0], str)


@pytest.mark.parametrize("flag", ["--hf_export", "--output_path"])
def test_an_s3_output_is_one_line_naming_the_flag(gcs, flag, capsys):
  with pytest.raises(SystemExit) as e:
    cli_evaluate.main(["--hf_model", os.path.join(DATA, "gpt2", "base"), flag, "s3://b/out", "--split", "validation"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith(f"error: {flag}=s3://b/out: s3:// cannot hold this") and "\n" not in err
