"""The demo sweep cut to 40 steps without evaluation: end-to-end wall time of --vmap vs separate runs
(docs/experiment.md).

  python -m dispersion_jax sweep --config configs/sweeps/demo_timing.py --workdir runs/sweeps/timing_sep --no-eval
  python -m dispersion_jax sweep --config configs/sweeps/demo_timing.py --workdir runs/sweeps/timing_vmap --no-eval --vmap
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location("_demo_sweep", os.path.join(os.path.dirname(__file__), "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config()
  c.overrides["steps"] = 40
  c.overrides["eval_every"] = 0
  c.overrides["checkpoint_every"] = 40
  return c
