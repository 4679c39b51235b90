"""Data layer: text (parquet / jsonl / txt, a prepared TFDS dataset, the embedded corpus) -> a parallel,
deterministic build of pre-packed blocks (inputs.py, readers.py, token_files.py, build.py, build_stages.py,
packed.py) -> step-indexed global batches that are the same on every topology (loader.py). Settings: config.py
(DataConfig).

Nothing is imported here: build workers import only the modules they need.
"""
