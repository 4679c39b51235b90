"""`python -m dispersion_jax.sweep`: the command line lives in cli/sweep.py (this module only keeps the name)."""

from dispersion_jax.cli.sweep import main

if __name__ == "__main__":
  main()
