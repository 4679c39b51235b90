"""Multiple-choice log-likelihood scoring vs golden HF logits (float64), metrics, few-shot, CLI and HF export."""

import json

import jax
import numpy as np
import pytest

from dispersion_jax import GPTConfig
from dispersion_jax.cli import evaluate as ev_cli
from dispersion_jax.research import evaluate as ev
from dispersion_jax.hf import load_gpt2, save_gpt2
from dispersion_jax.models import init_params
from dispersion_jax.tokenizer import get_tokenizer


@pytest.fixture(scope="module", autouse=True)
def x64_module():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="module")
def golden(gpt2_golden):
  d = gpt2_golden[1]
  logits = d["logits"]  # float64, from HF
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))  # log_softmax
  return d["input_ids"], logp


@pytest.fixture(scope="module")
def tiny_dir(gpt2_golden):
  return gpt2_golden[0]


@pytest.fixture(scope="module")
def tiny64(x64_module, tiny_dir):
  return load_gpt2(tiny_dir, dtype="float64", param_dtype="float64")


class SpaceIds:
  """Fake tokenizer: " 12 7" -> [12, 7]; lets tests choose token ids for the 512-token golden model."""

  eos_id = 0
  vocab_size = 512

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in text.split()]


def _ref_loglik(logp, ids, row, k, end):
  """Sum of log p(ids[t] | ids[:t]) for t in [k, end), from the golden logits."""
  return sum(logp[row, t - 1, ids[row, t]] for t in range(k, end))


def test_logliks_equal_golden_logits(golden, tiny64):
  ids, logp = golden
  cases = [(0, 10, 40), (1, 1, 40), (0, 39, 40), (1, 20, 25), (0, 5, 6), (1, 30, 38)]
  reqs = [(ids[r, :k].tolist(), ids[r, k:e].tolist()) for r, k, e in cases]
  ll, greedy = ev.score_requests(*tiny64, reqs, batch_size=4)
  want = [_ref_loglik(logp, ids, r, k, e) for r, k, e in cases]
  np.testing.assert_allclose(ll, want, rtol=0, atol=1e-9)
  want_greedy = [all(np.argmax(logp[r, t - 1]) == ids[r, t] for t in range(k, e)) for r, k, e in cases]
  assert greedy.tolist() == want_greedy
  # A greedy continuation is greedy.
  nxt = int(np.argmax(logp[0, 9]))
  _, g = ev.score_requests(*tiny64, [(ids[0, :10].tolist(), [nxt])])
  assert g.tolist() == [True]


def test_left_truncation(tiny64):
  cfg, params = tiny64
  rng = np.random.default_rng(0)
  ctx, cont = rng.integers(0, 512, 70).tolist(), rng.integers(0, 512, 10).tolist()
  keep = cfg.n_positions + 1 - len(cont)  # 64 inputs + 1 target
  ll, _ = ev.score_requests(cfg, params, [(ctx, cont), (ctx[-keep:], cont)])
  assert ll[0] == pytest.approx(ll[1], abs=1e-12)
  with pytest.raises(ValueError, match="does not fit"):
    ev.score_requests(cfg, params, [([1], list(range(65)))])
  with pytest.raises(ValueError, match="outside the model vocabulary"):
    ev.score_requests(cfg, params, [([1], [512])])


def test_choice_metrics_hand_built():
  # acc picks the larger sum (-10); acc_norm divides by bytes without the leading space: -10/1 < -12/18.
  assert ev.choice_metrics([-10.0, -12.0], [" a", " much longer answer"], 1) == {"acc": 0.0, "acc_norm": 1.0}
  assert ev.choice_metrics([-10.0, -12.0], [" a", " much longer answer"], 0) == {"acc": 1.0, "acc_norm": 0.0}
  # UTF-8 bytes, not characters: " é" is 2 bytes, so -3/2 > -2/1.
  assert ev.choice_metrics([-2.0, -3.0], [" x", " é"], 1) == {"acc": 0.0, "acc_norm": 1.0}


def test_evaluate_task_known_answer(golden, tiny64):
  ids, logp = golden
  ctx = " ".join(map(str, ids[0, :12]))
  best, worst = int(np.argmax(logp[0, 11])), int(np.argmin(logp[0, 11]))
  # Gold = the model's most likely next token: acc must be 1; acc_norm as computed by hand from the logits.
  ex = ev.Example((ctx, ctx), (f" {best}", f" {worst}"), 0, "x")
  res = ev.evaluate_task(*tiny64, SpaceIds(), [ex])
  assert res["acc"] == 1.0
  norm = [logp[0, 11, best] / len(str(best)), logp[0, 11, worst] / len(str(worst))]
  assert res["acc_norm"] == float(np.argmax(norm) == 0)
  np.testing.assert_allclose(res["examples"][0]["logliks"], [logp[0, 11, best], logp[0, 11, worst]], atol=1e-9)


def test_encode_pair_and_fewshot():
  tok = SpaceIds()
  assert ev.encode_pair(tok, "1 2 ", "3") == ([1, 2], [3])  # trailing space moves to the continuation
  assert ev.encode_pair(tok, "", " 5 6") == ([0], [5, 6])  # empty context -> [eos]
  exs = [ev.Example((f"c{i}",) * 2, (" a", " b"), i % 2, str(i)) for i in range(6)]
  p = ev.fewshot_prefix(exs, 2, 3, seed=1)
  shots = p.split("\n\n")[:-1]
  assert len(shots) == 3 and "c2 a" not in shots and len(set(shots)) == 3 and p.endswith("\n\n")
  assert all(s in [e.contexts[0] + e.choices[e.gold] for e in exs] for s in shots)
  assert p == ev.fewshot_prefix(exs, 2, 3, seed=1) and ev.fewshot_prefix(exs, 2, 0) == ""
  reqs = ev.build_requests(exs, 1, seed=1)
  assert len(reqs) == 12 and reqs[0][1] == " a" and reqs[0][0].endswith("\n\nc0")
  with pytest.raises(ValueError, match="num-fewshot"):
    ev.fewshot_prefix(exs, 0, 6)


def test_shipped_task_files_parse():
  for path in ev.DEFAULT_TASKS:
    exs = ev.load_task(path)
    assert len(exs) >= 20 and all(len(e.choices) == 4 for e in exs)
    assert {e.gold for e in exs} == {0, 1, 2, 3}


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
  res = ev_cli.main(
      [
          "--hf-model",
          gpt2_vocab_model,
          "--num-fewshot",
          "2",
          "--hf-export",
          str(export),
          "--out",
          str(out),
          "--batch-size",
          "32",
      ]
  )
  saved = json.loads(out.read_text())
  assert set(saved["tasks"]) == {"example_arithmetic", "example_cloze"}
  for name, r in saved["tasks"].items():
    assert r["num_examples"] == 20 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert r["acc"] == np.mean([e["acc"] for e in r["examples"]]) == res["tasks"][name]["acc"]
    assert all(len(e["logliks"]) == 4 and max(e["logliks"]) < 0 for e in r["examples"])
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
  _err(["--hf-model", TINY], "outside the model vocabulary", capsys)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "a", "choices": [" b"]}\n')
  _err(["--hf-model", TINY, "--tasks", str(bad)], "bad.jsonl:2", capsys)
  bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 2}\n')
  _err(["--hf-model", TINY, "--tasks", str(bad)], "'gold'", capsys)
  bad.write_text("not json\n")
  _err(["--hf-model", TINY, "--tasks", str(bad)], "invalid JSON", capsys)
  _err(["--hf-model", TINY, "--tasks", str(tmp_path / "missing.jsonl")], "not found", capsys)
  _err(["--hf-model", str(tmp_path)], "not found", capsys)
  _err(["--hf-model", TINY, "--step", "3"], None, capsys)
  _err(["--hf-model", TINY, "--num-fewshot", "-1"], None, capsys)


def test_cli_workdir(tmp_path, make_run, capsys):
  model_cfg, params = make_run(tmp_path / "run", 5, vocab_size=50257, n_positions=64)  # GPT-2 BPE fits
  out, export = tmp_path / "res.json", tmp_path / "hf"
  res = ev_cli.main(
      [
          "--workdir",
          str(tmp_path / "run"),
          "--tasks",
          str(ev.DEFAULT_TASKS[1]),
          "--hf-export",
          str(export),
          "--out",
          str(out),
      ]
  )
  assert res["tokenizer"] == "gpt2" and res["tasks"]["example_cloze"]["num_examples"] == 20
  # Same numbers as scoring the params directly, and the export holds the same weights.
  direct = ev.evaluate_task(model_cfg, params, get_tokenizer("gpt2"), ev.load_task(ev.DEFAULT_TASKS[1]))
  np.testing.assert_allclose(
      [e["logliks"] for e in res["tasks"]["example_cloze"]["examples"]],
      [e["logliks"] for e in direct["examples"]],
      atol=1e-5,
  )
  _, exported = load_gpt2(str(export))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), exported, params)
  _err(["--workdir", str(tmp_path / "run"), "--step", "6"], "no checkpoint", capsys)
  _err(["--workdir", str(tmp_path / "nothing")], "not a directory", capsys)
