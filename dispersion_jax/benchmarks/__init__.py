"""Speed and memory measurements (command line: `python -m dispersion_jax bench|bench-data|bench-dispersion|...`)."""
