"""Active forgetting (CE only) in the methods_cpu.py setup. The authors reset every 1000 steps of a 1,526-step run;
this 300-step run resets every 100 (forget_every), keeping their embedding schedule's shape (peak 5e-5, 8% warm-up,
the same step indexing), so it shows the mechanism, not their operating point."""

import importlib.util
import os

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location(
    "_methods_cpu", os.path.join(os.path.dirname(__file__), "methods_cpu.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ConfigDict:
  overrides = {**_base.OVERRIDES, "dispersion.coeff": 0.0, "baseline.forget_every": 100}
  return ConfigDict(
      {
          "base": "configs/gpt2_tiny.py",
          "overrides": overrides,
          "axes": {"baseline.method": ["active_forgetting"], "seed": _base.SEEDS},
          "eval": _base.EVAL,
      },
      allow_dotted_keys=True,
  )
