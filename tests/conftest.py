import os

# Eight fake CPU devices for the sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np
import pytest

GOLDEN = os.environ.get("DISPERSION_GOLDEN", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))


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


@pytest.fixture
def make_run():
  """Builds a training workdir as train.py leaves it: an Orbax checkpoint (state + run config) at `step`."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.checkpoint import Checkpointer
  from dispersion_jax.optim import make_optimizer
  from dispersion_jax.train_step import init_state

  def build(workdir, step: int, **model):
    cfg = config_lib.default_config()
    cfg.model.preset = "test"
    cfg.model.update(model)
    model_cfg = config_lib.model_config(cfg)
    state = init_state(model_cfg, make_optimizer(config_lib.optimizer_config(cfg), cfg.steps), 0)
    ckpt = Checkpointer(str(workdir), async_save=False)
    ckpt.save(step, state, None, cfg.to_dict())
    ckpt.close()
    return model_cfg, state.params

  return build


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
  """One data dir for the built default-corpus caches of the training tests (built once per seq_len)."""
  return str(tmp_path_factory.mktemp("corpus"))


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
  from dispersion_jax.optim import lr_schedule, make_optimizer

  opt, steps = config_lib.optimizer_config(cfg), config_lib.loop_config(cfg).steps
  return make_optimizer(opt, steps), lr_schedule(opt, steps)
