"""A training run: the step, the loop, the optimizer, checkpoints, metrics, resume rules, a finished run read back."""
