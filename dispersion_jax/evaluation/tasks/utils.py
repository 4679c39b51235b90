"""Local data for harness task YAMLs: `custom_dataset: !function utils.local_json` with
`dataset_kwargs: {data_files: {SPLIT: FILE.jsonl}}` reads JSON Lines files named relative to this directory, so
the YAMLs work from any checkout, offline. Plain `datasets` only (no package import): the torch reference venv of
tests/make_harness_reference.py loads it by path."""

import os

import datasets


def json_files(base_dir: str, data_files: dict[str, str]) -> "datasets.DatasetDict":
  return datasets.load_dataset("json", data_files={k: os.path.join(base_dir, v) for k, v in data_files.items()})


def local_json(data_files: dict[str, str], **_) -> "datasets.DatasetDict":
  return json_files(os.path.dirname(os.path.abspath(__file__)), data_files)
