"""The harness scorer vs golden HF logits (float64), rolling windows, the shipped example tasks, the paper suite,
the command (harness tasks, local data, HF export). Parity with the harness's own HFLM: tests/test_harness.py."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from dispersion_jax.evaluation import evaluate as ev
from dispersion_jax.evaluation import harness  # noqa: E402
from dispersion_jax.interop.hf import load_gpt2


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


@pytest.fixture(scope="module")
def lm64(tiny64):
  return harness.JaxLM(*tiny64, SpaceIds(), batch_size=4)


def test_logliks_equal_golden_logits(golden, lm64):
  """The harness scorer (batched, bucketed, sharded over 8 CPU devices) against HF's float64 logits."""
  ids, logp = golden
  cases = [(0, 10, 40), (1, 1, 40), (0, 39, 40), (1, 20, 25), (0, 5, 6), (1, 30, 38)]
  reqs = [(None, ids[r, :k].tolist(), ids[r, k:e].tolist()) for r, k, e in cases]
  ll, greedy = zip(*lm64._loglikelihood_tokens(reqs))
  want = [_ref_loglik(logp, ids, r, k, e) for r, k, e in cases]
  np.testing.assert_allclose(ll, want, rtol=0, atol=1e-9)
  want_greedy = [all(np.argmax(logp[r, t - 1]) == ids[r, t] for t in range(k, e)) for r, k, e in cases]
  assert list(greedy) == want_greedy
  # A greedy continuation is greedy.
  nxt = int(np.argmax(logp[0, 9]))
  assert lm64._loglikelihood_tokens([(None, ids[0, :10].tolist(), [nxt])])[0][1] is True


def test_left_truncation(lm64):
  rng = np.random.default_rng(0)
  ctx, cont = rng.integers(0, 512, 70).tolist(), rng.integers(0, 512, 10).tolist()
  keep = lm64.max_length + 1 - len(cont)  # 64 inputs + 1 target
  (a, _), (b, _) = lm64._loglikelihood_tokens([(None, ctx, cont), (None, ctx[-keep:], cont)])
  assert a == pytest.approx(b, abs=1e-12)
  with pytest.raises(ValueError, match="continuation of 65 tokens"):
    lm64._loglikelihood_tokens([(None, [1], list(range(65)))])
  with pytest.raises(ValueError, match="outside the model vocabulary"):
    lm64._loglikelihood_tokens([(None, [1], [512])])


def test_rolling_windows_sum_to_the_golden_sequence_loglik(golden, lm64):
  """loglikelihood_rolling over a text of 40 tokens in a 64 window: one window, log p(all 40 | eos) with the
  prefix token 0 (SpaceIds' eos); in a 16-token window (three disjoint windows) the harness's window rule."""
  from lm_eval.api.instance import Instance
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

  ids, _ = golden
  text = " ".join(map(str, ids[0]))
  full = lm64._loglikelihood_tokens([(None, [0], ids[0].tolist())])[0][0]
  got = lm64.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
  assert got == pytest.approx(full, abs=1e-9)
  lm16 = harness.JaxLM(lm64.cfg, lm64.params, SpaceIds(), batch_size=4, max_length=16)
  windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids[0].tolist(), 0, 16, 1)]
  want = sum(ll for ll, _ in lm16._loglikelihood_tokens([(None, c, x) for c, x in windows]))
  assert len(windows) == 3
  got16 = lm16.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
  assert got16 == pytest.approx(want, abs=1e-9) and got16 < full


def test_shipped_example_tasks_are_harness_tasks():
  from dispersion_jax.evaluation import harness_tasks

  tm = harness_tasks.task_manager(include_defaults=False)
  harness_tasks.check_names(tm, harness_tasks.expand(ev.DEFAULT_TASKS))
  for name in ev.DEFAULT_TASKS:
    docs = [json.loads(line) for line in (ev.TASK_DIR / f"{name}.jsonl").read_text().splitlines()]
    assert len(docs) == 20 and {d["gold"] for d in docs} == {0, 1, 2, 3}


def test_paper_suite_expands_to_the_authors_settings():
  from dispersion_jax.evaluation import harness_tasks as ht

  gpt2 = {s.name: (s.num_fewshot, s.limit) for s in ht.expand(["paper"])}
  qwen = {s.name: (s.num_fewshot, s.limit) for s in ht.expand(["paper_qwen3"])}
  assert len(gpt2) == 11 and set(ht.PAPER_ACC_TASKS) < set(gpt2) and "paloma_wikitext_103" in gpt2
  assert gpt2["piqa"] == (0, 500) and gpt2["mmlu"] == (1, 500) and qwen["arc_easy"] == (5, 200)
  assert qwen["winogrande"] == (0, 200)
  flat = ht.flat_metrics({"results": {t: {"acc,none": i / 10, "acc_stderr,none": 0.1} for i, t in enumerate(gpt2)}})
  assert flat["lm_eval/paper_avg"] == pytest.approx(np.mean([flat[f"lm_eval/{t}/acc"] for t in ht.PAPER_ACC_TASKS]))
  assert not any("stderr" in k for k in flat)
