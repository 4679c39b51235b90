"""The documented demo sweep (docs/experiment.md): baseline (coeff 0) vs angular_spread dispersion at three
strengths, two seeds each, on a tiny GPT-2 and the embedded English corpus; CPU-sized (--vmap: one compiled step).

  python -m dispersion_jax sweep --config configs/sweeps/demo.py --vmap
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  return ConfigDict(
      {
          "base": "configs/gpt2_tiny.py",
          "overrides": {
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
              "optimizer.lr": 2e-3,
              "optimizer.warmup": 0.1,
              "dispersion.variant": "angular_spread",
              "dispersion.loc": "all",
              "dispersion.clamp_threshold": 0.1,
          },
          "axes": {"dispersion.coeff": [0.0, 0.1, 0.5, 1.0], "seed": [0, 1]},
          "eval": {"num_texts": 64, "max_length": 64},
      },
      allow_dotted_keys=True,
  )
