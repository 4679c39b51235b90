"""Data layer: embedded corpus / text dirs / TFDS -> pre-tokenized ArrayRecord -> packed Grain batches."""

from dispersion_jax.data.pipeline import build_dataset, make_dataset, make_iterator, measure_throughput

__all__ = ["build_dataset", "make_dataset", "make_iterator", "measure_throughput"]
