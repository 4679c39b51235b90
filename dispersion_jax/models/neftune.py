"""NEFTune-style embedding noise, the paper's first baseline, as the authors' scripts add it (PerturbationTrainer.
compute_loss in `*_other_counter_condensation.py`): uniform noise in +-alpha / sqrt(L * D) on the token-embedding
output, on training steps only. The models call it (they own the embedding output); the run's settings live in
training/baselines.py with the other baseline, active forgetting.
"""

import jax
import jax.numpy as jnp


def neftune_bound(alpha: float, seq_len: int, width: int) -> float:
  """Half-width of the uniform noise: alpha / sqrt(L * D), L the (packed, unpadded) sequence length."""
  return alpha / (seq_len * width) ** 0.5


def add_embedding_noise(x_BxLxD: jax.Array, alpha: float, key: jax.Array) -> jax.Array:
  """x + U(-m, m) with m = neftune_bound(alpha, L, D); no gradient flows into the noise."""
  m = neftune_bound(alpha, x_BxLxD.shape[1], x_BxLxD.shape[2])
  noise = jax.random.uniform(key, x_BxLxD.shape, jnp.float32, -m, m)
  return x_BxLxD + noise.astype(x_BxLxD.dtype)
