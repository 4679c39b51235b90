"""`python -m dispersion_jax.bench`: the command line lives in cli/bench.py (this module only keeps the name)."""

from dispersion_jax.cli.bench import main

if __name__ == "__main__":
  main()
