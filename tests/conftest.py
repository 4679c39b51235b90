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
