"""Which harness tasks run, with which shots and limits, on which data; and how their results are logged.

- Suites: `paper` (GPT-2) and `paper_qwen3` expand to the paper's tasks with the authors' settings: zero-shot
  anli_r2, lambada_openai, openbookqa, piqa, truthfulqa_mc2, winogrande; k-shot arc_easy, arc_challenge, mmlu,
  medmcqa (k = 1 for GPT-2, 5 for Qwen3); paloma_wikitext_103 word perplexity; `limit` 500 (GPT-2) / 200 (Qwen3)
  documents per task. `lm_eval/paper_avg` is the mean `acc` of the ten accuracy tasks (the results table's average).
- `run_tasks` calls `lm_eval.simple_evaluate` once per (num_fewshot, limit) group and merges what it returns.
- `local_data_overrides` points every task of a list (groups and tags followed down to their tasks) at local copies:
  a task YAML per task that `include:`s the built-in one and sets `dataset_path` to DATA_DIR/<its Hub dataset id>
  (a snapshot of the Hub dataset repository, see docs/evaluation.md).
- `flat_metrics`: `lm_eval/TASK/METRIC` scalars (METRIC without the `,none` filter suffix) for metrics.jsonl.
"""

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import yaml

PAPER_ZERO_SHOT = ("anli_r2", "lambada_openai", "openbookqa", "piqa", "truthfulqa_mc2", "winogrande")
PAPER_K_SHOT = ("arc_easy", "arc_challenge", "mmlu", "medmcqa")
PAPER_PERPLEXITY = ("paloma_wikitext_103",)
PAPER_ACC_TASKS = PAPER_ZERO_SHOT + PAPER_K_SHOT  # the ten the paper averages
SUITES = {"paper": (1, 500), "paper_qwen3": (5, 200)}  # name -> (k of the k-shot tasks, limit)
EXAMPLES_DIR = pathlib.Path(__file__).parent / "tasks"  # the shipped example task YAMLs: always found


@dataclasses.dataclass(frozen=True)
class HarnessEvalConfig:
  """The `eval.*` section: harness tasks on the live parameters during training (train.py's evaluation hook)."""

  tasks: str = ""  # comma-separated task names or suites (paper, paper_qwen3); "" = none
  num_fewshot: int | None = None  # None: each task's (suite's) own
  limit: float | None = None  # documents per task; None: the suite's, else all
  include_path: str | None = None  # a folder of task YAMLs
  every: int | None = None  # steps between harness runs (a multiple of eval_every); None = every evaluation
  batch_size: int = 16

  def __post_init__(self):
    if self.num_fewshot is not None and self.num_fewshot < 0:
      raise ValueError(f"eval.num_fewshot={self.num_fewshot} must be >= 0")
    if self.limit is not None and self.limit <= 0:
      raise ValueError(f"eval.limit={self.limit} must be > 0")
    if self.every is not None and self.every < 1 or self.batch_size < 1:
      raise ValueError(f"eval.every={self.every} and eval.batch_size={self.batch_size} must be >= 1")
    if self.include_path is not None and not os.path.isdir(self.include_path):
      raise ValueError(f"eval.include_path={self.include_path} is not a directory")

  @property
  def names(self) -> list[str]:
    return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  num_fewshot: int | None = None  # None: the task's own default
  limit: int | float | None = None


def expand(names: Sequence[str], num_fewshot: int | None = None, limit: float | None = None) -> list[TaskSpec]:
  """Task names (suites expanded) with their shots and limit; explicit num_fewshot / limit override the suite's."""
  out = []
  for name in names:
    if name in SUITES:
      k, lim = SUITES[name]
      lim = lim if limit is None else limit
      out += [TaskSpec(t, 0 if num_fewshot is None else num_fewshot, lim) for t in PAPER_ZERO_SHOT + PAPER_PERPLEXITY]
      out += [TaskSpec(t, k if num_fewshot is None else num_fewshot, lim) for t in PAPER_K_SHOT]
    else:
      out.append(TaskSpec(name, num_fewshot, limit))
  return out


def task_manager(include_path: str | Sequence[str] | None = None, include_defaults: bool = True):
  """The harness's task index: its built-in tasks, the shipped examples, then include_path (later ones win).
  Kept per set of paths: indexing the 14,686 built-in names takes seconds, and sweeps evaluate many checkpoints."""
  paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
  return _task_manager((str(EXAMPLES_DIR), *map(str, paths)), include_defaults)


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def check_names(tm, specs: Sequence[TaskSpec]) -> None:
  """ValueError with one line naming the first unknown task (before any data is read)."""
  unknown = [s.name for s in specs if s.name not in tm.all_tasks]
  if unknown:
    raise ValueError(f"unknown harness task {unknown[0]!r}: not built in and not under --include_path")


def run_tasks(
    lm, specs: Sequence[TaskSpec], tm, *, log_samples: bool = False, bootstrap_iters: int = 0, **kwargs: Any
) -> dict[str, Any]:
  """simple_evaluate per (num_fewshot, limit) group, merged: results, configs, versions, n-shot, samples, ..."""
  import lm_eval

  # The harness bootstraps stderrs in a multiprocessing pool: a fork of this multithreaded JAX process, which can
  # deadlock (JAX warns at every fork). Serial bootstrap instead.
  os.environ.setdefault("DISABLE_MULTIPROC", "1")
  groups: dict[tuple, list[str]] = {}
  for s in specs:
    groups.setdefault((s.num_fewshot, s.limit), []).append(s.name)
  merged: dict[str, Any] = {}
  for (k, limit), names in groups.items():
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=tm,
        num_fewshot=k,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        **kwargs,
    )
    if out is None:  # processes other than 0 get None from the harness
      continue
    for key, value in out.items():
      if isinstance(value, dict) and isinstance(merged.get(key), dict):
        merged[key].update(value)
      else:
        merged.setdefault(key, value)
  return merged


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """`lm_eval/TASK/METRIC` for every finite number in results["results"] (stderrs left out), plus
  `lm_eval/paper_avg` when all ten paper accuracy tasks are there."""
  out = {}
  for task, metrics in (results.get("results") or {}).items():
    for key, value in metrics.items():
      if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      metric, _, filt = key.partition(",")
      if key == "sample_len" or not math.isfinite(value):
        continue
      out[f"lm_eval/{task}/{metric if filt in ('', 'none') else key}"] = float(value)
  accs = [out.get(f"lm_eval/{t}/acc") for t in PAPER_ACC_TASKS]
  if all(a is not None for a in accs):
    out["lm_eval/paper_avg"] = sum(accs) / len(accs)
  return out


def live_evaluator(hcfg: HarnessEvalConfig, model_cfg, tokenizer_name: str, mesh):
  """For the training loop: params -> flat_metrics of hcfg's tasks on those (live, sharded) params. Every process
  calls it; process 0 runs the harness and the others follow its jitted calls (harness.JaxLM.serve), getting {}."""
  from dispersion_jax.data.tokenizer import get_tokenizer
  from dispersion_jax.evaluation import harness

  specs = expand(hcfg.names, hcfg.num_fewshot, hcfg.limit)
  tokenizer = get_tokenizer(tokenizer_name)
  state: dict[str, Any] = {}

  def evaluate(params) -> dict[str, float]:
    lm = harness.JaxLM(model_cfg, params, tokenizer, mesh=mesh, batch_size=hcfg.batch_size)
    if not lm.lead:
      lm.serve()
      return {}
    if "tm" not in state:  # the task index (5 s for the built-in one), once per run; names checked at the first use
      state["tm"] = task_manager(hcfg.include_path)
      check_names(state["tm"], specs)
    try:
      return flat_metrics(run_tasks(lm, specs, state["tm"]))
    finally:
      lm.close()

  return evaluate


def _leaves(tm, name: str, seen: set[str]) -> set[str]:
  """The tasks under a task, group or tag name."""
  from lm_eval.tasks._index import Kind

  if name in seen:
    return set()
  seen.add(name)
  entry = tm.task_index.get(name)
  if entry is None:
    raise ValueError(f"unknown harness task {name!r}")
  if entry.kind in (Kind.TASK, Kind.PY_TASK):
    return {name}
  if entry.kind == Kind.TAG:
    members = [n for n, e in tm.task_index.items() if name in e.tags]
  else:
    listed = (entry.cfg or {}).get("task") or []
    members = [m if isinstance(m, str) else m.get("task") for m in ([listed] if isinstance(listed, str) else listed)]
  return set().union(*(_leaves(tm, m, seen) for m in members if m)) if members else set()


def local_data_overrides(tm, names: Sequence[str], data_dir: str, out_dir: str) -> list[str]:
  """Write out_dir/<task>.yaml for every task under `names`: the built-in task with dataset_path =
  data_dir/<its dataset_path>. Returns the dataset directories it expects; ValueError names a missing one."""
  needed = set()
  os.makedirs(out_dir, exist_ok=True)
  for task in sorted(set().union(*(_leaves(tm, n, set()) for n in names))):
    entry = tm.task_index[task]
    hub_path = (entry.cfg or {}).get("dataset_path")
    if entry.yaml_path is None or not hub_path:
      continue  # a Python-defined task or one without a dataset: nothing to point anywhere
    local = os.path.join(os.path.abspath(data_dir), hub_path)
    needed.add(local)
    with open(os.path.join(out_dir, f"{task}.yaml"), "w") as fh:
      yaml.safe_dump({"include": str(entry.yaml_path), "task": task, "dataset_path": local}, fh)
  missing = sorted(p for p in needed if not os.path.isdir(p))
  if missing:
    raise ValueError(
        f"--data_dir: {missing[0]} is missing ({len(missing)} dataset folders missing); download it as shown in "
        "docs/evaluation.md"
    )
  return sorted(needed)
