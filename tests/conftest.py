import json
import os
import pathlib

# Eight fake CPU devices for the sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np
import pytest

from dispersion_jax.parallel import backend  # noqa: E402

# With the `compile` extra installed and no accelerator here: the CPU only, as the commands do (backend.py); the
# accelerator compilers are then used for dry-run targets only.
backend.prefer_cpu_without_accelerator()

# The parity references (float64 outputs of the authors' PyTorch losses, tiny Hugging Face GPT-2 / Qwen3 models and
# their outputs): `shared/golden/` of the project's shared folder, which sits beside the repository (../shared from
# the repository root), or DISPERSION_GOLDEN. Without it the parity tests skip, and the session says so loudly.
GOLDEN = os.path.abspath(
    os.environ.get("DISPERSION_GOLDEN", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))
)
_NO_GOLDEN = (
    f"WARNING: the golden folder {GOLDEN} is missing: every parity test against the authors' PyTorch code and "
    "Hugging Face will be SKIPPED. Set DISPERSION_GOLDEN=/path/to/golden or place shared/ beside the repository."
)


def pytest_report_header(config):
  return f"goldens: {GOLDEN}" if os.path.isdir(GOLDEN) else _NO_GOLDEN


def pytest_terminal_summary(terminalreporter):
  if not os.path.isdir(GOLDEN):
    terminalreporter.write_sep("!", "parity tests skipped", red=True, bold=True)
    terminalreporter.write_line(_NO_GOLDEN, red=True, bold=True)


@pytest.fixture
def x64():
  """Float64 for one test (parity with the float64 references), restored afterwards."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def golden_dir() -> str:
  if not os.path.isdir(GOLDEN):
    pytest.skip(f"golden folder {GOLDEN} absent (set DISPERSION_GOLDEN or place shared/ beside the repo)")
  return GOLDEN


@pytest.fixture(scope="session")
def disp_golden(golden_dir):
  import json

  with open(os.path.join(golden_dir, "dispersion_reference.json")) as fh:
    meta = json.load(fh)
  return meta, dict(np.load(os.path.join(golden_dir, "dispersion_reference.npz")))


@pytest.fixture(scope="session")
def gpt2_golden(golden_dir):
  return os.path.join(golden_dir, "gpt2_tiny"), dict(np.load(os.path.join(golden_dir, "gpt2_tiny_reference.npz")))


def write_run(workdir, step: int, **model):
  """A training workdir as train.py leaves it: an Orbax checkpoint (state + run config) at `step`; returns the
  (model config, params) saved."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.training.checkpoint import Checkpointer
  from dispersion_jax.training.optim import make_optimizer
  from dispersion_jax.training.train_step import init_state

  cfg = config_lib.default_config()
  cfg.model.preset = "test"
  cfg.model.update(model)
  model_cfg = config_lib.model_config(cfg)
  state = init_state(model_cfg, make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), 0)
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, state, None, cfg.to_dict())
  ckpt.close()
  return model_cfg, state.params


@pytest.fixture
def make_run():
  """Builds a training workdir as train.py leaves it (write_run)."""
  return write_run


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
  """One data dir for the built default-corpus caches of the training tests (built once per seq_len)."""
  return str(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[pathlib.Path, list[tuple[str, str]]]:
  """Parquet (several row groups), jsonl (with a blank line and a blank text) and nested txt files, and the
  (doc id, text) of every document in build order."""
  import pyarrow as pa  # noqa: PLC0415 - only the data-build tests need it
  import pyarrow.parquet as pq  # noqa: PLC0415
  from data_build_helpers import random_text  # noqa: PLC0415

  root = tmp_path_factory.mktemp("mixed")
  rng = np.random.default_rng(0)
  docs = []
  (root / "a").mkdir()
  texts = [random_text(i, rng) for i in range(70)]
  pq.write_table(pa.table({"id": list(range(70)), "text": texts}), root / "a" / "part.parquet", row_group_size=9)
  docs += [(f"a/part.parquet:{i}", t) for i, t in enumerate(texts)]
  lines, offset = [], 0
  for i in range(70, 140):
    line = json.dumps({"text": random_text(i, rng), "n": i}) + "\n"
    docs.append((f"b.jsonl@{offset}", json.loads(line)["text"]))
    lines.append(line)
    offset += len(line.encode())
    if i == 100:
      lines.append("\n")  # a blank line: skipped
      offset += 1
  lines.append(json.dumps({"text": "   "}) + "\n")  # a blank document: dropped
  (root / "b.jsonl").write_text("".join(lines))
  (root / "c" / "d").mkdir(parents=True)
  for i in range(140, 170):
    rel = f"c/{'d/' if i % 2 else ''}{i}.txt"
    (root / rel).write_text(random_text(i, rng))
    docs.append((rel, (root / rel).read_text()))
  (root / "notes.md").write_text("not an input")
  (root / ".hidden.txt").write_text("hidden: not an input")
  order = {
      rel: k for k, rel in enumerate(sorted(["a/part.parquet", "b.jsonl", *(d for d, _ in docs if d.endswith(".txt"))]))
  }
  ranked = sorted(enumerate(docs), key=lambda kd: (order[kd[1][0].split(":")[0].split("@")[0]], kd[0]))
  return root, [d for _, d in ranked]


# Hang guards (the timeouts of waits for a process or a file that end a stuck test, not bounds under test) scale
# with DISPERSION_TEST_TIME_SCALE, e.g. 3 on a slow or overloaded machine. A bound that IS the feature under test
# ("a killed peer stops the others within ~100 s") does not scale: its test states its margin instead.
TIME_SCALE = float(os.environ.get("DISPERSION_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
  """A hang guard of `seconds` on an idle machine, scaled by DISPERSION_TEST_TIME_SCALE."""
  return seconds * TIME_SCALE


# The tiny GPT-2 run of test_train.py and test_train_resume.py (both import these: `from conftest import ...`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.n_layer=2",
    "--config.model.n_embd=32",
    "--config.model.n_head=4",
    "--config.model.n_positions=32",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.eval_every=0",
    "--config.log_every=1",
    "--config.optimizer.lr=3e-3",
]


@pytest.fixture(scope="module")
def data_dir(corpus_dir):
  return corpus_dir


def tiny_cfg(data_dir: str, *overrides: str):
  from dispersion_jax import config as config_lib

  flags = [*TINY, f"--config.data.data_dir={data_dir}", *overrides]
  return config_lib.load(os.path.join(REPO, "configs/gpt2_tiny.py"), [f.removeprefix("--config.") for f in flags])


def optimizer(cfg):
  """The run's optimizer and schedule, as train.run builds them."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.training.optim import lr_schedule, make_optimizer

  opt, steps = config_lib.optimizer_config(cfg), config_lib.loop_config(cfg).steps
  return make_optimizer(opt, steps), lr_schedule(opt, steps)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus_dir):
  """A 12-step run with a checkpoint every 4 steps (all kept), logging every 2, evaluating every 4. Shared by the
  history and resume-rule tests, which copy it before changing it. (corpus_dir, not the module-scoped data_dir it
  equals: a session fixture may not use a module one.)"""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  flags = ["--config.steps=12", "--config.checkpoint_every=4", "--config.log_every=2", "--config.eval_every=4"]
  from dispersion_jax.training import train

  cfg = tiny_cfg(corpus_dir, *flags, "--config.max_to_keep=None")
  assert train.run(cfg, str(workdir)) == 12
  return workdir, flags + ["--config.max_to_keep=None"]


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on a free loopback port for the whole session (started and stopped here), with this process's
  environment pointing every storage library at it (subprocesses inherit it). Skips without the `test` extra."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  from gcs_emulator import Emulator  # noqa: PLC0415

  emulator = Emulator().start()
  saved = {k: os.environ.get(k) for k in emulator.environment()}
  os.environ.update(emulator.environment())
  try:
    yield emulator
  finally:
    emulator.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
