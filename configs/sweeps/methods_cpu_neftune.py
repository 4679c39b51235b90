"""NEFTune-style embedding noise (CE only, alpha 1.0: the authors' GPT-2 default) in the methods_cpu.py setup."""

import importlib.util
import os

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location(
    "_methods_cpu", os.path.join(os.path.dirname(__file__), "methods_cpu.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ConfigDict:
  overrides = {**_base.OVERRIDES, "dispersion.coeff": 0.0}
  return ConfigDict(
      {
          "base": "configs/gpt2_tiny.py",
          "overrides": overrides,
          "axes": {"baseline.method": ["neftune"], "seed": _base.SEEDS},
          "eval": _base.EVAL,
      },
      allow_dotted_keys=True,
  )
