"""The command-line layer: the only code that reads argv (one parser style, one-line errors, exit code 2)."""
