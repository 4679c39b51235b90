"""The key/value cache of incremental decoding, shared by both families' attention modules.

A cache is the flax collection "cache": per attention module `key` and `value` [B, S, G, K] (S = cache length,
G = kv heads). It exists only when a caller applies the model with `mutable=["cache"]`: the first such call (on a
[B, S] input, see decode.init_cache) creates zero arrays of the input's shapes; later calls write each token's
key/value at its own position (its slot: row b's token at position p lives in slot p, so rows of different
lengths need no left padding) and attend to every slot <= the query's position. Slots past a row's length hold
stale values that the mask never lets a query see. Training never makes the collection mutable, so its code
path is untouched.
"""

import jax.numpy as jnp


def update(module, k_BxLxGxK, v_BxLxGxK, positions_BxL):
  """(keys [B, S, G, K], values [B, S, G, K], mask [B, L, S]) once the cache exists; None for plain attention."""
  if positions_BxL is None or not module.is_mutable_collection("cache"):
    return None
  initialised = module.has_variable("cache", "key")
  key = module.variable("cache", "key", jnp.zeros, k_BxLxGxK.shape, k_BxLxGxK.dtype)
  value = module.variable("cache", "value", jnp.zeros, v_BxLxGxK.shape, v_BxLxGxK.dtype)
  if not initialised:  # the creating call: its own input is the whole sequence, plain causal attention is right
    return None
  rows_Bx1 = jnp.arange(k_BxLxGxK.shape[0])[:, None]
  key.value = key.value.at[rows_Bx1, positions_BxL].set(k_BxLxGxK)
  value.value = value.value.at[rows_Bx1, positions_BxL].set(v_BxLxGxK)
  slots_S = jnp.arange(key.value.shape[1])
  return key.value, value.value, slots_S[None, None, :] <= positions_BxL[:, :, None]
