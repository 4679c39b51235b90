"""dispersion_jax: JAX/Flax training stack for the dispersion loss (embedding condensation regulariser).

The public API: the two model families and their interface, the dispersion loss, the training objective and
Hugging Face interchange. Everything else is imported from its folder (docs/architecture.md has the map).
"""

# Two things run at import, on purpose, because a package import is the first code any of our processes runs:
# - a data-build worker (multiprocessing spawn) imports this package before its pool initializer could run, and
#   must already end with its parent if the parent dies then (parallel/lifeline.py; a no-op unless the parent set
#   DISPERSION_EXIT_WITH_PARENT);
# - jax's first import loads the CUDA PJRT plugin when the `compile` extra is installed, which prints two C++
#   notes on machines without a GPU; they would precede every command's one-line error (parallel/quiet.py).
from dispersion_jax.parallel import lifeline as _lifeline

_lifeline.from_environment()

from dispersion_jax.parallel.quiet import without_plugin_notes  # noqa: E402

with without_plugin_notes():
  from dispersion_jax.interop.hf import load_pretrained, save_pretrained
  from dispersion_jax.losses.dispersion import VARIANTS, dispersion_loss
  from dispersion_jax.losses.objective import DispersionConfig, objective, select_layers
  from dispersion_jax.models import GPT, GPTConfig, Qwen3, Qwen3Config, build_model, hidden_states, init_params

__all__ = [
    "VARIANTS",
    "dispersion_loss",
    "GPT",
    "GPTConfig",
    "Qwen3",
    "Qwen3Config",
    "build_model",
    "hidden_states",
    "init_params",
    "load_pretrained",
    "save_pretrained",
    "DispersionConfig",
    "objective",
    "select_layers",
]
__version__ = "0.2.0"
