"""The losses: the dispersion variants (reference, fused, Mosaic GPU kernel), fused cross-entropy, the objective."""
