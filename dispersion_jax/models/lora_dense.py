"""nn.Dense with an optional LoRA adapter, the dense layer of both families (models/gpt2.py, models/qwen3.py).

Without a `lora` variable collection it is exactly nn.Dense (same parameters, same numbers). Given one, i.e.
`model.apply({"params": base, "lora": adapters}, ...)` with adapters `{"a": [in, r], "b": [r, out]}` (B already
times alpha / r, lora.py) at the layer's own path, it returns

  y = x @ W (+ bias) + dropout(x) @ A @ B

as PEFT's `lora.Linear` computes it: dropout on the adapter's input only, and only where a `lora` rng is given
(training steps; evaluation passes none). Under nn.scan the collection is sliced on its leading layer axis like
the parameters. The adapter path runs in the compute dtype, like the base matmul.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


class LoraDense(nn.Dense):
  lora_dropout: float = 0.0  # PEFT's lora_dropout: on the adapter's input, training steps only

  def __call__(self, x_BxLxI):
    # The output carries the layer's name for remat policies that save by name (remat.py's `minimal`).
    return checkpoint_name(self._dense(x_BxLxI), self.name)

  def _dense(self, x_BxLxI):
    y_BxLxO = super().__call__(x_BxLxI)
    if not self.has_variable("lora", "a"):
      return y_BxLxO
    a_IxR, b_RxO = self.get_variable("lora", "a"), self.get_variable("lora", "b")
    dtype = self.dtype or jnp.result_type(x_BxLxI, a_IxR)
    x_BxLxI = x_BxLxI.astype(dtype)
    if self.lora_dropout and self.has_rng("lora"):
      keep = jax.random.bernoulli(self.make_rng("lora"), 1.0 - self.lora_dropout, x_BxLxI.shape)
      x_BxLxI = jnp.where(keep, x_BxLxI / (1.0 - self.lora_dropout), jnp.zeros((), dtype))
    h_BxLxR = jnp.dot(x_BxLxI, a_IxR.astype(dtype))
    return y_BxLxO + jnp.dot(h_BxLxR, b_RxO.astype(dtype)).astype(y_BxLxO.dtype)
