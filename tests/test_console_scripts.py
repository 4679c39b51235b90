"""Every console script of pyproject.toml, run the way a user runs it: the installed executable beside this
Python (`pip install -e .` / `-r requirements.txt` puts it there), in its own process. Each exits 0 when it
succeeded and 2 on a user error (cli/common.py), so `dispersion-data-build ... && dispersion-train ...` trains;
and stderr carries no Python object (before: the wrapper's `sys.exit(main())` printed the BuildReport, dict or
list that main returned, and exited 1). data-build, eval, generate, condensation and results succeed for real on
tiny inputs. The others (train, sweep, the benchmarks: minutes of work) are held to the same by their code: no
main returns a value (checked here for every command), and each answers --help in tests/test_architecture.py.
Each script costs a process that imports JAX (~5 CPU-seconds): one user error each, one success per real path.
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import REPO, scaled

with open(os.path.join(REPO, "pyproject.toml"), "rb") as _fh:
  _TABLE = tomllib.load(_fh)["project"]["scripts"]
SCRIPTS = sorted(_TABLE)
COMMAND_MODULES = {s: _TABLE[s].removeprefix("dispersion_jax.cli.").removesuffix(":main") for s in SCRIPTS}
BIN = os.path.dirname(sys.executable)
# What a returned object looks like on stderr: a line that is a list or dict, a dataclass or namedtuple repr, an
# object's default repr, or a traceback.
OBJECT = re.compile(r"^\s*[\[{(]|^\w+\(\w+=|object at 0x|Traceback", re.MULTILINE)
REAL = ("dispersion-condensation", "dispersion-data-build", "dispersion-eval", "dispersion-generate", "dispersion-results")


def run(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
  path = os.path.join(BIN, script)
  assert os.access(path, os.X_OK), f"{script} is not installed beside {sys.executable}: pip install -e ."
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HF_DATASETS_OFFLINE": "1"}
  return subprocess.run(
      [path, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=scaled(240)  # a hang guard
  )


def clean(r: subprocess.CompletedProcess, code: int) -> None:
  assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
  assert not OBJECT.search(r.stderr), r.stderr[-3000:]


def write_tiny_run(workdir, root) -> None:
  """A run as train.py leaves it, without training: one checkpoint (step 2) of the "test" preset with GPT-2's
  vocabulary, reading root/text at seq_len 16, and its metrics (an evaluation with the harness rows of
  example_cloze, so `results` tabulates without running the harness)."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.training.checkpoint import Checkpointer
  from dispersion_jax.training.optim import make_optimizer
  from dispersion_jax.training.train_step import init_state

  cfg = config_lib.default_config()
  cfg.model.update(preset="test", vocab_size=50257, n_positions=64)
  cfg.update(seq_len=16, steps=2, checkpoint_every=2)
  cfg.data.update(source="text_dir", text_dir=str(root / "text"), cache_dir=str(root / "data"))
  model_cfg = config_lib.model_config(cfg)
  state = init_state(model_cfg, make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), 0)
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(2, state, None, cfg.to_dict())
  ckpt.close()
  evaluation = {"step": 2, "val_loss": 8.0, "val_ppl": 2981.0, "val_dispersion": -0.1}
  evaluation.update({"lm_eval/example_cloze/acc": 0.5, "lm_eval/example_cloze/acc_norm": 0.5})
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    fh.write(json.dumps({"step": 2, "loss": 9.0, "ce": 9.0}) + "\n" + json.dumps(evaluation) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """root/text (a small English-like corpus), the one-point sweep root/sweep.py of the run root/sweep/seed-0, whose
  dataset is built (eval --split reads it) and token ids for condensation: what the real success paths read."""
  from dispersion_jax.cli import data as data_cli

  root = tmp_path_factory.mktemp("scripts")
  (root / "text").mkdir()
  words = "the river stone light garden silver morning quiet north field bread window".split()
  with open(root / "text" / "docs.jsonl", "w") as fh:
    for i in range(200):
      fh.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(40))}) + "\n")
  write_tiny_run(root / "sweep" / "seed-0", root)
  data_cli.run(data_cli.parser().parse_args(["--workdir", str(root / "sweep" / "seed-0"), "--workers", "1"]))
  (root / "base.py").write_text(
      "from dispersion_jax.config import default_config\n\n\ndef get_config():\n  c = default_config()\n"
      "  c.model.preset = 'test'\n  c.model.vocab_size = 50257\n  c.model.n_positions = 64\n  c.seq_len = 16\n"
      "  c.steps = 2\n  c.checkpoint_every = 2\n  return c\n"
  )
  (root / "sweep.py").write_text(
      "from ml_collections import ConfigDict\n\n\ndef get_config():\n"
      f"  return ConfigDict({{'base': '{root / 'base.py'}', 'axes': {{'seed': [0]}},\n"
      "                     'eval': {'num_texts': 2, 'max_length': 8, 'tasks': ['example_cloze']}},\n"
      "                    allow_dotted_keys=True)\n"
  )
  np.save(root / "ids.npy", np.arange(16, dtype=np.int32).reshape(2, 8))
  return root


# script -> (its arguments, what its success leaves in stdout or files)
def success(script: str, root, out) -> tuple[list[str], object]:
  run_dir = str(root / "sweep" / "seed-0")
  return {
      "dispersion-data-build": (
          [
              "--config",
              os.path.join(REPO, "configs/gpt2_tiny.py"),
              "--config.seq_len=16",
              "--config.data.source=text_dir",
              f"--config.data.text_dir={root / 'text'}",
              f"--config.data.cache_dir={out / 'data'}",
              "--workers",
              "1",
          ],
          lambda r: "built: " in r.stdout and (out / "data" / "dispersion_packed").is_dir(),
      ),
      "dispersion-eval": (
          ["--workdir", run_dir, "--split", "validation", "--num_batches", "1", "--batch_size", "1"],
          lambda r: "validation" in r.stdout and "ppl=" in r.stdout,
      ),
      "dispersion-generate": (
          ["--workdir", run_dir, "--prompt", "The river", "--max_new_tokens", "2"],
          lambda r: "--- 'The river'" in r.stdout,
      ),
      "dispersion-condensation": (
          ["--workdir", run_dir, "--token_ids", str(root / "ids.npy"), "--max_length", "8", "--out", str(out)],
          lambda r: (out / "condensation.json").is_file(),
      ),
      "dispersion-results": (
          ["--sweep_dir", str(root / "sweep"), "--config", str(root / "sweep.py"), "--out", str(out)],
          lambda r: "| 1 | 2 |" in (out / "results_table.md").read_text(),
      ),
  }[script]


def test_every_command_has_a_console_script():
  from dispersion_jax.__main__ import COMMANDS

  assert SCRIPTS == sorted(f"dispersion-{c}" for c in COMMANDS) and set(REAL) <= set(SCRIPTS)


@pytest.mark.parametrize("module", sorted({COMMAND_MODULES[s] for s in SCRIPTS}))
def test_every_main_returns_nothing(module):
  """The console-script wrapper is `sys.exit(main())`: a main that returned its report would exit 1 after a
  success and print the object. Each main returns None (a `return` without a value); `run` returns the result."""
  tree = ast.parse(pathlib.Path(REPO, "dispersion_jax", "cli", f"{module}.py").read_text())
  (main,) = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main"]
  returns = [n for n in ast.walk(main) if isinstance(n, ast.Return) and n.value is not None]
  assert not returns, f"cli/{module}.py main returns a value (line {returns[0].lineno}); return it from run()"
  assert main.returns is None or ast.unparse(main.returns) in ("None", "int", "int | None"), ast.unparse(main.returns)


@pytest.mark.slow
@pytest.mark.parametrize("script", REAL)
def test_a_success_exits_0_with_nothing_but_output(script, tiny, tmp_path):
  args, done = success(script, tiny, tmp_path / "out")
  (tmp_path / "out").mkdir()
  r = run(script, *args, cwd=str(tmp_path))
  clean(r, 0)
  assert done(r), r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_user_error_exits_2_in_one_line(script, tmp_path):
  r = run(script, "--no_such_flag", cwd=str(tmp_path))
  clean(r, 2)
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # nothing created
