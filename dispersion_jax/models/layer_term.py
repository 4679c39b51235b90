"""A scalar of each block's output, computed inside the layer loop: how a regulariser on hidden states (the dispersion
term, losses/objective.py) costs one layer's memory instead of every layer's.

Computed after the loop from the sown hidden states, a per-layer term keeps all n of them live at once, with the
term's own temporaries (in the default dispersion impl, a [B, L, F] float32 gradient per layer) beside them: +27% to
+47% of a step's temp memory on the TPU fit table (docs/accelerator-fit.md). Computed inside the block, the term
runs under the block's remat policy: with `remat=full` its forward is recomputed in the backward pass, one layer at a
time, like the block's own activations.

The families' blocks (gpt2.py, qwen3.py) call `sow` after sowing `hidden`; `layer_terms` reads the values
back. The model's `layer_term` argument is a `LayerTerm`; its arrays (`inputs`) travel as call arguments, the rest as
a module attribute (a function and a tuple), because flax module attributes must not hold traced arrays.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayerTerm:
  fn: Callable  # (h_BxLxD, index, inputs) -> scalar; index: the hidden-state index 1..n (a traced int under scan)
  layers: tuple[int, ...]  # the hidden-state indices it is computed at; elsewhere it is 0 and never computed
  inputs: Any = None  # the arrays fn reads (an rng key, masks): the same at every layer

  def static(self) -> "LayerTerm":
    return dataclasses.replace(self, inputs=None)


def split(term: LayerTerm | None, n_layer: int, scanned: bool):
  """(the module attribute, the call arguments): scanned blocks get (inputs, indices 1..n) to broadcast and scan."""
  if term is None:
    return None, (None, None)
  bad = [i for i in term.layers if not 1 <= i <= n_layer]
  if bad:
    raise ValueError(f"layer_term.layers={term.layers}: indices must be in 1..n_layer={n_layer}")
  return term.static(), (term.inputs, jnp.arange(1, n_layer + 1) if scanned else None)


def sow(module, term: LayerTerm | None, h_BxLxD, index, inputs) -> None:
  """Sow `term` (the value, or 0 where the layer is not selected) as intermediates/term of `module`."""
  if term is None:
    return
  compute = lambda: term.fn(h_BxLxD, index, inputs)
  if isinstance(index, int):  # unrolled blocks: the selection is static, so unselected layers trace nothing
    value = compute() if index in term.layers else None
  else:  # scanned blocks: one body for every layer, so a cond skips the term's work where it is not selected
    out = jax.eval_shape(compute)
    zero = lambda: jnp.zeros(out.shape, out.dtype)
    value = jax.lax.cond(jnp.isin(index, jnp.asarray(term.layers)), compute, zero)
  if value is not None:
    module.sow("intermediates", "term", value)


def layer_terms(variables: dict, layers: tuple[int, ...]) -> dict[int, jax.Array]:
  """The sown values {hidden-state index: scalar} of the selected layers (scanned: one [n] array; else per block)."""
  inter = variables["intermediates"]
  if "h" in inter:
    stacked_N = inter["h"]["term"][0]
    return {i: stacked_N[i - 1] for i in layers}
  return {i: inter[f"h_{i - 1}"]["term"][0] for i in layers}
