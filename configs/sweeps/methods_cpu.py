"""The paper's four methods on a 2-core CPU (docs/experiment.md): CE only, angular_spread dispersion, NEFTune-style
embedding noise and active forgetting, three seeds each, on a 4-layer, width-64 GPT-2 and the embedded corpus.
This file is the CE-only and dispersion half (one vmapped group); the baselines are methods_cpu_neftune.py and
methods_cpu_forgetting.py, trained into the same sweep directory (the baselines are CE only, so they cannot be an
axis crossed with dispersion.coeff):

  for s in methods_cpu methods_cpu_neftune methods_cpu_forgetting; do
    python -m dispersion_jax sweep --config configs/sweeps/$s.py --workdir runs/sweeps/methods --vmap; done
  python -m dispersion_jax results --sweep_dir runs/sweeps/methods --config configs/sweeps/methods_cpu.py \\
      configs/sweeps/methods_cpu_neftune.py configs/sweeps/methods_cpu_forgetting.py \\
      --group_by baseline.method,dispersion.coeff
"""

from ml_collections import ConfigDict

OVERRIDES = {
    "model.n_layer": 4,
    "model.n_embd": 64,
    "model.n_head": 4,
    "model.n_positions": 64,
    "seq_len": 64,
    "batch_size": 8,
    "steps": 300,
    "log_every": 10,
    "eval_every": 100,
    "eval_batches": 8,
    "checkpoint_every": 100,
    "max_to_keep": None,
    "optimizer.lr": 2e-3,
    "optimizer.warmup": 0.1,
    "dispersion.variant": "angular_spread",
    "dispersion.loc": "all",
    "dispersion.clamp_threshold": 0.1,
}
SEEDS = [0, 1, 2]
EVAL = {"num_texts": 64, "max_length": 64}


def get_config() -> ConfigDict:
  return ConfigDict(
      {
          "base": "configs/gpt2_tiny.py",
          "overrides": OVERRIDES,
          "axes": {"dispersion.coeff": [0.0, 0.5], "seed": SEEDS},
          "eval": EVAL,
      },
      allow_dotted_keys=True,
  )
