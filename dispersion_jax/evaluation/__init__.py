"""Evaluation: lm-evaluation-harness on our models, its tasks, decoding, condensation statistics, a run evaluated."""
