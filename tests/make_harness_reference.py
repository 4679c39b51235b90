"""Makes tests/data/harness/reference.json: what the harness's own torch `HFLM` and transformers' `generate`
give on the tiny GPT-2 / Qwen3 directories of tests/harness_helpers.py, for tests/test_harness.py (CI has no torch).

Two steps, because the directories are made with this package (JAX) and scored in a torch venv without JAX:
  source /work/main/.venv/bin/activate; PYTHONPATH=$PWD python tests/make_harness_reference.py models /tmp/hfref
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 /work/refvenv/bin/python tests/make_harness_reference.py reference \\
      /tmp/hfref tests/data/harness/reference.json
(/work/refvenv: torch 2.13.0+cpu, transformers 5.25.0, lm_eval 0.4.13; float32, CPU, batch size 1.)
"""

import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
TASKS = HERE / "data" / "harness" / "tasks"
RUNS = {  # name -> (tasks, num_fewshot): what test_harness.py runs with our model and compares
    "zero_shot": (["tiny_mc", "tiny_cloze", "tiny_ppl", "tiny_gen"], 0),
    "two_shot": (["tiny_mc"], 2),
}
GEN_PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
GEN_TOKENS = 10


def _models(out: str) -> None:
  sys.path.insert(0, str(HERE))
  import harness_helpers

  for family in harness_helpers.CONFIGS:
    harness_helpers.make_tiny_hf(family, os.path.join(out, family))


def _jsonable(x):
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (bool, int, float, str)) or x is None:
    return x
  return float(x) if hasattr(x, "__float__") else str(x)


def _reference(models_dir: str, out_json: str) -> None:
  import lm_eval
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  torch.manual_seed(0)
  out = {
      "made_with": {
          "lm_eval": lm_eval.__version__,
          "torch": torch.__version__,
          "transformers": transformers.__version__,
      },
      "families": {},
  }
  tm = TaskManager(include_path=str(TASKS), include_defaults=False)
  for family in ("gpt2", "qwen3"):
    path = os.path.join(models_dir, family)
    lm = HFLM(pretrained=path, batch_size=1, dtype="float32", device="cpu")
    fam = {"runs": {}, "generate": []}
    for name, (tasks, k) in RUNS.items():
      res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=k, log_samples=True)
      fam["runs"][name] = {
          "results": _jsonable(res["results"]),
          "samples": {
              t: [{"doc_id": s["doc_id"], "resps": _jsonable(s["resps"])} for s in res["samples"][t]] for t in tasks
          },
      }
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in GEN_PROMPTS:
      ids = tok(prompt, return_tensors="pt").input_ids
      with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
      fam["generate"].append(
          {"prompt": prompt, "prompt_ids": ids[0].tolist(), "new_ids": gen[0, ids.shape[1] :].tolist()}
      )
    out["families"][family] = fam
  with open(out_json, "w") as fh:
    json.dump(out, fh, indent=1)
    fh.write("\n")


if __name__ == "__main__":
  if sys.argv[1] == "models":
    _models(sys.argv[2])
  else:
    _reference(sys.argv[2], sys.argv[3])
