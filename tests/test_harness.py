"""Our models under lm-evaluation-harness (dispersion_jax/harness.py) against the harness's own torch `HFLM` and
transformers' `generate`, on tiny GPT-2 / Qwen3 directories: the reference outputs are test data
(tests/data/harness/reference.json, made by tests/make_harness_reference.py in a torch venv), so this runs without
torch. Per request: log-likelihood within 1e-4 and the same greedy flag; per task: the same metrics; generations
token-identical."""

import json
import math

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import harness_helpers
import make_harness_reference as ref_script

from dispersion_jax.cli import generate as gen_cli
from dispersion_jax.data.tokenizer import get_tokenizer
from dispersion_jax.evaluation import decode, harness
from dispersion_jax.evaluation import evaluate as ev

REF = json.loads(harness_helpers.REFERENCE.read_text())


@pytest.fixture(scope="module")
def task_manager():
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=str(harness_helpers.TASKS), include_defaults=False)


@pytest.fixture(scope="module", params=sorted(harness_helpers.CONFIGS))
def tiny(request, tmp_path_factory):
  family = request.param
  path = harness_helpers.make_tiny_hf(family, tmp_path_factory.mktemp(family))
  cfg, params, tok_name = ev.load_model(hf_model=path)
  lm = harness.JaxLM(cfg, params, get_tokenizer(tok_name), batch_size=4)
  lm.path = path
  return family, lm


def _close(ours, theirs, where):
  """Equal structure; floats within 1e-4 (log-likelihoods) or 1e-9 relative (aggregates of equal inputs)."""
  if isinstance(theirs, list):
    assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(ours, theirs)):
      _close(a, b, f"{where}[{i}]")
  elif isinstance(theirs, bool) or isinstance(theirs, str):
    assert ours == theirs, where
  else:
    assert abs(float(ours) - theirs) <= 1e-4, f"{where}: ours {ours} vs HFLM {theirs}"


@pytest.mark.parametrize("run", sorted(ref_script.RUNS))
def test_requests_and_metrics_match_hflm(tiny, task_manager, run):
  family, lm = tiny
  tasks, k = ref_script.RUNS[run]
  ref = REF["families"][family]["runs"][run]
  out = lm_eval.simple_evaluate(
      model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=k, log_samples=True, bootstrap_iters=0
  )
  for task in tasks:
    ours = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in ref["samples"][task]]
    for mine, theirs in zip(ours, ref["samples"][task]):
      _close(mine["resps"], theirs["resps"], f"{family}/{run}/{task}/doc {mine['doc_id']}")
    for metric, value in ref["results"][task].items():
      if metric.endswith(",none") and "stderr" not in metric:
        assert math.isclose(out["results"][task][metric], value, rel_tol=1e-5), (task, metric)


def test_the_reference_exercises_truncation_windows_and_shots():
  """The comparison above means something: the long question overflows the 64-token window, the long text
  needs several rolling windows, the 2-shot prompts differ from the 0-shot ones."""
  tok = get_tokenizer("gpt2")
  docs = [json.loads(line) for line in (harness_helpers.TASKS / "tiny_mc_val.jsonl").read_text().splitlines()]
  assert max(len(tok.encode(d["question"])) for d in docs) > 64
  texts = [json.loads(line)["text"] for line in (harness_helpers.TASKS / "tiny_ppl.jsonl").read_text().splitlines()]
  assert max(len(tok.encode(t)) for t in texts) > 2 * 64
  runs = REF["families"]["gpt2"]["runs"]
  zero, two = runs["zero_shot"]["samples"]["tiny_mc"], runs["two_shot"]["samples"]["tiny_mc"]
  # The shots change every prompt except the long one, whose left-truncated window holds no shot either way.
  assert [a["resps"] != b["resps"] for a, b in zip(zero, two)] == [True, True, True, False, True]


def test_greedy_generation_is_token_identical_to_transformers(tiny):
  family, lm = tiny
  cases = REF["families"][family]["generate"]
  prompts = [lm.tok_encode(c["prompt"]) for c in cases]
  assert prompts == [c["prompt_ids"] for c in cases]
  for use_cache in (True, False):  # one batch of prompts of different lengths
    got = decode.generate(lm.cfg, lm.params, prompts, ref_script.GEN_TOKENS, lm.eot_token_id, use_cache=use_cache)
    assert got == [c["new_ids"] for c in cases], (family, use_cache)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
  """Rows of different lengths share one batch (right-padded, each token in its own cache slot)."""
  _, lm = tiny
  prompts = [lm.tok_encode(c["prompt"]) for c in REF["families"]["gpt2"]["generate"]]
  batched = decode.generate(lm.cfg, lm.params, prompts, ref_script.GEN_TOKENS, lm.eot_token_id)
  single = [decode.generate(lm.cfg, lm.params, [p], ref_script.GEN_TOKENS, lm.eot_token_id)[0] for p in prompts]
  assert batched == single


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny):
  """The references hold no greedy continuation; the model's own greedy tokens must be flagged greedy and
  one changed token must not."""
  _, lm = tiny
  ctx = lm.tok_encode("The capital of France is")
  cont = decode.generate(lm.cfg, lm.params, [ctx], 3, lm.eot_token_id)[0]
  (ll, greedy), (ll2, greedy2) = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, cont[:2] + [cont[2] + 1])])
  assert greedy and not greedy2 and ll > ll2


def test_sampling_filters_match_a_numpy_rederivation():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
  got = np.asarray(decode.filter_logits(logits, 0.7, 10, 0.8))
  for row, out in zip(logits, got):
    x = row / 0.7
    x = np.where(x < np.sort(x)[-10], -np.inf, x)
    order = np.argsort(x)
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    drop = np.cumsum(p) <= 0.2
    drop[-1] = False
    want = x.copy()
    want[order[drop]] = -np.inf
    np.testing.assert_array_equal(np.isinf(out), np.isinf(want))
    np.testing.assert_allclose(out[~np.isinf(out)], want[~np.isinf(want)], rtol=1e-6)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
  _, lm = tiny
  ids = [lm.tok_encode("Once upon a time")]
  warm = decode.Sampling(do_sample=True, temperature=1.5)
  a, b, c = (decode.generate(lm.cfg, lm.params, ids, 8, lm.eot_token_id, warm, seed=s)[0] for s in (1, 1, 2))
  assert a == b and a != c
  one = decode.Sampling(do_sample=True, temperature=1.5, top_k=1)
  assert decode.generate(lm.cfg, lm.params, ids, 8, lm.eot_token_id, one, seed=3) == decode.generate(
      lm.cfg, lm.params, ids, 8, lm.eot_token_id
  )


def test_stop_sequences_and_max_gen_toks(tiny):
  _, lm = tiny
  from lm_eval.api.instance import Instance

  full = decode.generate(lm.cfg, lm.params, [lm.tok_encode("Q: hi\nA:")], 5, lm.eot_token_id)[0]
  text = lm.tok_decode(full)
  stop = text[len(text) // 2 :][:2]
  req = lambda kw: Instance("generate_until", {}, ("Q: hi\nA:", kw), 0)  # noqa: E731
  got = lm.generate_until([req({"until": [stop], "max_gen_toks": 5}), req({"until": [], "max_gen_toks": 2})])
  assert got[0] == text.split(stop)[0]
  assert got[1] == lm.tok_decode(full[:2])


def test_generate_command_prints_the_greedy_continuation(tiny, capsys):
  family, lm = tiny
  case = REF["families"][family]["generate"][0]
  texts = gen_cli.run(gen_cli.parse_args(["--hf_model", lm.path, "--prompt", case["prompt"], "--max_new_tokens", "10"]))
  assert texts == [lm.tok_decode([t for t in case["new_ids"] if t != lm.eot_token_id])]
  assert case["prompt"] + texts[0] in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    gen_cli.main(["--hf_model", lm.path, "--prompt", "x", "--max_new_tokens", "64"])
  assert e.value.code == 2 and "leaves no room" in capsys.readouterr().err
