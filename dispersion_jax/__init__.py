"""dispersion_jax: JAX/Flax training stack for the dispersion loss (embedding condensation regulariser)."""

from dispersion_jax import lifeline as _lifeline

_lifeline.from_environment()  # first: a build worker still importing the package ends with its parent too

from dispersion_jax.quiet import without_plugin_notes  # noqa: E402

with without_plugin_notes():  # jax's first import loads the CUDA plugin, if installed (quiet.py)
  from dispersion_jax.dispersion import VARIANTS, dispersion_loss
  from dispersion_jax.hf import load_pretrained, save_pretrained
  from dispersion_jax.models import GPT, GPTConfig, Qwen3, Qwen3Config, build_model, hidden_states
  from dispersion_jax.objective import DispersionConfig, objective, select_layers

__all__ = [
    "VARIANTS",
    "dispersion_loss",
    "GPT",
    "GPTConfig",
    "Qwen3",
    "Qwen3Config",
    "build_model",
    "hidden_states",
    "load_pretrained",
    "save_pretrained",
    "DispersionConfig",
    "objective",
    "select_layers",
]
__version__ = "0.2.0"
