"""dispersion_jax: JAX/Flax training stack for the dispersion loss (embedding condensation regulariser)."""
from dispersion_jax.dispersion import VARIANTS, dispersion_loss
from dispersion_jax.models import GPT, GPTConfig, hidden_states
from dispersion_jax.objective import DispersionConfig, objective, select_layers

__all__ = ["VARIANTS", "dispersion_loss", "GPT", "GPTConfig", "hidden_states", "DispersionConfig", "objective",
           "select_layers"]
__version__ = "0.1.0"
