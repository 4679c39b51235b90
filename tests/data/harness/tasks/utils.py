"""The tasks of this directory read local JSON Lines files named relative to it, through the package's loader
(dispersion_jax/evaluation/tasks/utils.py), loaded by path: the torch venv that made reference.json has no JAX."""

import importlib.util
import os
import pathlib

_SHIPPED = pathlib.Path(__file__).resolve().parents[4] / "dispersion_jax" / "evaluation" / "tasks" / "utils.py"
_spec = importlib.util.spec_from_file_location("_dispersion_task_utils", _SHIPPED)
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)


def local_json(data_files: dict[str, str], **_):
  return _loader.json_files(os.path.dirname(os.path.abspath(__file__)), data_files)
