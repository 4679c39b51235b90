"""What does each model.remat policy keep for the backward pass? (models/remat.py states it; this checks it.)

`minimal` (MaxText's) keeps the outputs of the named projections and nothing else; `dots` keeps the same matmul
outputs, chosen by primitive; `full` keeps nothing inside a block. Projections whose output backward never reads
(down_proj / the MLP's c_proj feed only the residual add) are not residuals under any policy.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals  # jax.ad_checkpoint.print_saved_residuals, as data

from dispersion_jax.models import build_model, init_params
from dispersion_jax.models.gpt2 import GPTConfig
from dispersion_jax.models.qwen3 import Qwen3Config
from dispersion_jax.models.remat import PROJECTIONS

CONFIGS = {"gpt2": GPTConfig, "qwen3": Qwen3Config}


def _residuals(family: str, remat: str) -> list[tuple[tuple, str]]:
  cfg = CONFIGS[family].preset("test", remat=remat, n_layer=1)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jnp.zeros((2, 16), jnp.int32)
  res = saved_residuals(lambda p: build_model(cfg).apply({"params": p}, ids).sum(), params)
  return [(aval.shape, why) for aval, why in res if "from the argument" not in why]  # parameters are not activations


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_each_policy_saves_what_remat_py_says(family):
  full = _residuals(family, "full")  # outside the blocks (embedding, head) every policy saves the same
  assert not [why for _, why in full if "named" in why], full
  minimal = [r for r in _residuals(family, "minimal") if r not in full]
  names = {re.search(r"named '(\w+)'", why).group(1) for _, why in minimal}  # AttributeError: an unnamed value
  assert names <= set(PROJECTIONS)
  assert names >= ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"} if family == "qwen3" else
                   {"c_attn", "c_fc"})  # fmt: skip
  dots = [r for r in _residuals(family, "dots") if r not in full]
  assert dots and all("dot_general" in why for _, why in dots)
  assert sorted(s for s, _ in dots) == sorted(s for s, _ in minimal)  # the same tensors, chosen another way
