"""The controlled width study (configs/sweeps/width_study.py) cut to a 2-core CPU: MLP width n_inner 64 / 256 /
1024 / 4096 at a fixed residual width, CE only (dispersion.coeff 0) vs angular_spread dispersion (coeff 0.1),
three seeds: 24 runs of a 4-layer, width-64 GPT-2 on the embedded English corpus, 120 steps of 8 x 64 tokens each.

  python -m dispersion_jax sweep --config configs/sweeps/width_study_cpu.py --workdir runs/sweeps/width_cpu --vmap
  python -m dispersion_jax results --sweep_dir runs/sweeps/width_cpu --config configs/sweeps/width_study_cpu.py \
      --group_by model.n_inner,dispersion.coeff
  python -m dispersion_jax condensation-training --corpus default --num_texts 32 --max_length 64 \
      --workdirs runs/sweeps/width_cpu/coeff-0.0_n_inner-64_seed-0 runs/sweeps/width_cpu/coeff-0.1_n_inner-64_seed-0 \
      --labels "F=64 CE only,F=64 dispersion 0.1" --out runs/sweeps/width_cpu/over_training

With --vmap each width is one group of 6 members (2 coefficients x 3 seeds) trained in one compiled step (members
of a group may differ only in seed and dispersion.coeff). Every checkpoint is kept (max_to_keep None) and
evaluated at steps 40 / 80 / 120, so the results table can select checkpoints. A demonstration of the
tooling at a size that runs here, not the paper's experiment: 61,440 training tokens per model, and the 50257-way
tied LM head (3.2M of the parameters) dominates every width's compute. Measured on 2 shared CPU cores (load
average 2-7 from other jobs): seeds 0 and 1 with --vmap took 12.0 min wall (training, about 3 min per width group,
and the sweep's own evaluation), seed 2 added later 4.1 min, then cli.results 1.5 min (72 checkpoints evaluated;
seconds once cached). Results: docs/experiment.md.
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
              "steps": 120,
              "log_every": 10,
              "eval_every": 40,
              "eval_batches": 4,
              "checkpoint_every": 40,
              "max_to_keep": None,
              "optimizer.lr": 2e-3,
              "optimizer.warmup": 0.1,
              "dispersion.variant": "angular_spread",
              "dispersion.loc": "all",
              "dispersion.clamp_threshold": 0.1,
          },
          "axes": {"model.n_inner": [64, 256, 1024, 4096], "dispersion.coeff": [0.0, 0.1], "seed": [0, 1, 2]},
          "eval": {"num_texts": 32, "max_length": 64},
      },
      allow_dotted_keys=True,
  )
