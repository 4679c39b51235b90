"""Compiling the train step for a target without its hardware: the dry run, its report, targets, the chip table."""
