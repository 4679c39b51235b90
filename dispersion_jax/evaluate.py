"""`python -m dispersion_jax.evaluate`: the command line lives in cli/evaluate.py (this module only keeps the name)."""

from dispersion_jax.cli.evaluate import main

if __name__ == "__main__":
  main()
