"""The tasks of this directory read local JSON Lines files named relative to it (`custom_dataset`), so the
YAMLs work from any checkout, offline."""

import os

import datasets


def local_json(data_files: dict[str, str], **_):
  here = os.path.dirname(os.path.abspath(__file__))
  return datasets.load_dataset("json", data_files={k: os.path.join(here, v) for k, v in data_files.items()})
