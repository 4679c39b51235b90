"""The controlled width study (the paper's Figure 3 experiment, extended with dispersion on/off): GPT-2-like models
pre-trained from scratch that differ only in the MLP width n_inner = 64 / 256 / 1024 / 4096, with the number of
layers, the residual width, the data and the training settings fixed; CE only (dispersion.coeff 0) vs the
dispersion loss (coeff 0.1); three seeds. 24 runs. GPU-sized (one H100/H200-class device per run or per vmapped
width group).

  python -m dispersion_jax data-build --config configs/gpt2_small.py --config.data.source=text_dir \
      --config.data.text_dir=data/wikitext-103-raw-v1 --config.data.doc_grouping=wikitext    # once
  python -m dispersion_jax sweep --config configs/sweeps/width_study.py --workdir runs/sweeps/width [--vmap]
  python -m dispersion_jax results --sweep_dir runs/sweeps/width --config configs/sweeps/width_study.py \
      --group_by model.n_inner,dispersion.coeff --rules last,val,test,test_group
  python -m dispersion_jax condensation-training --corpus default --num_texts 64 --max_length 1024 \
      --workdirs runs/sweeps/width/coeff-0.0_n_inner-64_seed-0 runs/sweeps/width/coeff-0.1_n_inner-64_seed-0 \
      --labels "F=64 CE,F=64 dispersion" --out runs/sweeps/width/over_training

What follows the authors' script (LM-Dispersion transformer_dispersion/pretrain_toy_gpt2_change_ffn/
pretrain_toy_gpt2.py: `--ffn_intermediate` sets GPT-2's n_inner on a randomly initialised `gpt2` config):
- the model: GPT-2 small's shapes (12 layers, width 768, 12 heads, 1024 positions, the GPT-2 BPE, tied head),
  only n_inner changes (the GPT-2 default is 4 x 768 = 3072);
- the data: wikitext-103 (raw), 1024-token blocks: DATA_DIR below is the Hugging Face Salesforce/wikitext
  wikitext-103-raw-v1 parquet files (train-*.parquet, validation-*.parquet); edit it to where they are and build
  the dataset once (command above; the embedded corpus is far too small for this budget);
- the optimisation: AdamW (0.9, 0.95), weight decay 0.1, lr 5e-5 (their default, on one device) with cosine decay
  to 0 after a 20% warm-up, 128 x 1024 = 131,072 tokens per step (their 16 per device x 8 accumulation);
  clip 0.125: their HF Trainer sums the 8 micro-batch gradients before clipping at 1.0, which clips the mean
  gradient at 1/8 (we average micro-batches, see README);
- evaluation: every max_steps // 5 + 1 = 306 steps and at the end (their `--num_ckpt 5`), each checkpoint kept
  (max_to_keep None) so `cli.results` can select per checkpoint, as their table does.
Chosen here (not in their script or not fixed by it): the token budget, 200M tokens = 1,526 steps (their GPT-2
mid-training budget; the width script takes `--train_tokens` on the command line); the dispersion settings of the
project's GPT-2 recipe (configs/midtrain_gpt2.py: angular_spread on all layers, coeff 0.1, clamp 0.1, tau_cos 1,
256 sampled tokens; their script's CLI default coefficient is 1.0 and its plots use the CE-only runs); three seeds;
grad_accum 4 (32 sequences per micro-batch; any value gives the same step, pick what fits the device); the
sweep's own evaluation (the two shipped smoke tasks and condensation on 64 corpus texts): give harness task names
or the `paper` suite in `eval.tasks` / `cli.results --tasks` for the paper's benchmarks (docs/evaluation.md).
"""

from ml_collections import ConfigDict

DATA_DIR = "data/wikitext-103-raw-v1"


def get_config() -> ConfigDict:
  return ConfigDict(
      {
          "base": "configs/gpt2_small.py",
          "overrides": {
              "data.source": "text_dir",
              "data.text_dir": DATA_DIR,
              "data.doc_grouping": "wikitext",
              "seq_len": 1024,
              "batch_size": 128,
              "grad_accum": 4,
              "steps": 1526,
              "log_every": 10,
              "eval_every": 306,
              "eval_batches": 16,
              "checkpoint_every": 306,
              "max_to_keep": None,
              "optimizer.lr": 5e-5,
              "optimizer.warmup": 0.2,
              "optimizer.min_lr_ratio": 0.0,
              "optimizer.b1": 0.9,
              "optimizer.b2": 0.95,
              "optimizer.weight_decay": 0.1,
              "optimizer.clip": 0.125,
              "dispersion.variant": "angular_spread",
              "dispersion.loc": "all",
              "dispersion.tau_cos": 1.0,
              "dispersion.clamp_threshold": 0.1,
              "dispersion.max_tokens": 256,
          },
          "axes": {"model.n_inner": [64, 256, 1024, 4096], "dispersion.coeff": [0.0, 0.1], "seed": [0, 1, 2]},
          "eval": {"num_texts": 64, "max_length": 1024},
      },
      allow_dotted_keys=True,
  )
