"""Data layer: text (parquet / jsonl / txt, a prepared TFDS dataset, the embedded corpus) -> a parallel,
deterministic build of pre-packed blocks (build.py, packed.py, inputs.py) -> step-indexed global batches that are
the same on every topology (loader.py). Settings: config.py (DataConfig).

Nothing is imported here: build workers import only the modules they need.
"""
