"""The evaluation command on the harness route: the shipped example tasks, OUT.json, --log_samples, local data
for built-in tasks (--data_dir), HF export, a training run's checkpoint, one-line errors."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from dispersion_jax import GPTConfig
from dispersion_jax.cli import evaluate as ev_cli
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.evaluation import harness
from dispersion_jax.interop.hf import load_gpt2, save_gpt2
from dispersion_jax.models import init_params


@pytest.fixture(scope="module")
def tiny_dir(gpt2_golden):
  return gpt2_golden[0]


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory):
  """A random tiny model with the full GPT-2 vocabulary, so real text tokenizes into its range."""
  cfg = GPTConfig(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
  params = init_params(cfg, jax.random.key(0))
  path = tmp_path_factory.mktemp("rand_gpt2")
  save_gpt2(str(path), cfg, params)
  return str(path)


def test_cli_end_to_end_with_export(gpt2_vocab_model, tmp_path):
  out, export = tmp_path / "res.json", tmp_path / "hf"
  argv = ["--hf-model", gpt2_vocab_model, "--num-fewshot", "2", "--hf-export", str(export), "--out", str(out)]
  res = ev_cli.run(ev_cli.parse_args(argv + ["--batch-size", "32", "--log_samples", "--limit", "8"]))
  saved = json.loads(out.read_text())
  assert set(saved["results"]) == {"example_arithmetic", "example_cloze"} == set(saved["configs"])
  for name, r in saved["results"].items():
    assert saved["n-shot"][name] == 2 and saved["n-samples"][name]["effective"] == 8
    samples = saved["samples"][name]
    # acc recomputed from the logged per-choice log-likelihoods (4 choices, all negative)
    lls = [[resp[0][0] for resp in s["resps"]] for s in samples]
    assert all(len(x) == 4 and max(x) < 0 for x in lls)
    acc = np.mean([np.argmax(x) == s["target"] for x, s in zip(lls, samples)])
    assert r["acc,none"] == pytest.approx(acc) == res["results"][name]["acc,none"]
  # The export is an HF GPT-2 dir with the same weights and a GPT-2 tokenizer.
  cfg, params = load_gpt2(str(export))
  _, ref = load_gpt2(gpt2_vocab_model)
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  assert (export / "vocab.json").is_file() and (export / "merges.txt").is_file()


def _err(argv, match, capsys):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    ev_cli.main(argv)
  assert e.value.code != 0
  if match:
    msg = capsys.readouterr().err.strip()
    assert match in msg and "\n" not in msg, msg


def test_cli_bad_inputs(tiny_dir, tmp_path, capsys):
  TINY = tiny_dir
  # English through GPT-2 BPE does not fit the golden model's 512-token vocabulary.
  _err(["--hf-model", TINY], "wrong tokenizer", capsys)
  _err(["--hf-model", TINY, "--tokenizer", "gpt2", "--tasks", "no_such_task"], "wrong tokenizer", capsys)
  _err(["--hf-model", str(tmp_path)], "not found", capsys)
  _err(["--hf-model", TINY, "--include_path", str(tmp_path / "nope")], "not a directory", capsys)
  _err(["--hf-model", TINY, "--step", "3"], None, capsys)
  _err(["--hf-model", TINY, "--num-fewshot", "-1"], None, capsys)


def test_unknown_task_and_missing_local_data(tmp_path):
  from dispersion_jax.evaluation import harness_tasks

  tm = harness_tasks.task_manager()  # the built-in index (5 s): mmlu is a group of groups of tagged tasks
  with pytest.raises(ValueError, match="unknown harness task 'no_such_task'"):
    harness_tasks.check_names(tm, harness_tasks.expand(["piqa", "no_such_task"]))
  with pytest.raises(ValueError, match="cais/mmlu is missing"):
    harness_tasks.local_data_overrides(tm, ["mmlu"], str(tmp_path), str(tmp_path / "yaml"))
  assert len(list((tmp_path / "yaml").glob("mmlu_*.yaml"))) == 57


def test_data_dir_points_a_builtin_task_at_a_local_copy(gpt2_vocab_model, tmp_path):
  """piqa (the built-in YAML) on DATA/baber/piqa, a local stand-in of the Hub dataset: the real task's prompt."""
  local = tmp_path / "data" / "baber" / "piqa"
  local.mkdir(parents=True)
  docs = [{"goal": f"Open jar {i}", "sol1": " twist the lid", "sol2": " eat the lid", "label": 0} for i in range(3)]
  for split in ("train", "validation"):  # piqa's YAML names both splits
    (local / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  res = ev_cli.run(
      ev_cli.parse_args(
          ["--hf-model", gpt2_vocab_model, "--tasks", "piqa", "--data_dir", str(tmp_path / "data"), "--log_samples"]
          + ["--bootstrap_iters", "0"]
      )
  )
  assert res["n-samples"]["piqa"]["effective"] == 3
  assert res["samples"]["piqa"][0]["arguments"][0][0] == "Question: Open jar 0\nAnswer:"


def test_cli_workdir(tmp_path, make_run, capsys):
  model_cfg, params = make_run(tmp_path / "run", 5, vocab_size=50257, n_positions=64)  # GPT-2 BPE fits
  out, export = tmp_path / "res.json", tmp_path / "hf"
  argv = ["--workdir", str(tmp_path / "run"), "--tasks", "example_cloze", "--hf-export", str(export)]
  res = ev_cli.run(ev_cli.parse_args(argv + ["--output_path", str(out), "--log_samples", "--limit", "3"]))
  assert res["model"]["tokenizer"] == "gpt2" and res["n-samples"]["example_cloze"]["effective"] == 3
  # Same numbers as the harness scoring the params directly.
  lm = harness.JaxLM(model_cfg, params, get_tokenizer("gpt2"))
  sample = res["samples"]["example_cloze"][0]
  ctx, cont = sample["arguments"][0]
  direct = lm._loglikelihood_tokens([(None, *lm._encode_pair(ctx, cont))])[0][0]
  assert sample["resps"][0][0][0] == pytest.approx(direct, abs=1e-5)
  assert json.loads(out.read_text())["results"] == res["results"]
  _, exported = load_gpt2(str(export))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), exported, params)
  _err(["--workdir", str(tmp_path / "run"), "--step", "6"], "no checkpoint", capsys)
  _err(["--workdir", str(tmp_path / "nothing")], "not a directory", capsys)
