"""Validation: the run's fixed validation batches and the one definition of the validation metrics (loss,
perplexity, dispersion, condensation), shared by training's evaluations and `python -m dispersion_jax eval`.
"""

import functools
import math

import jax
from ml_collections import ConfigDict

from dispersion_jax.data import loader
from dispersion_jax.data.packed import PackedDataset
from dispersion_jax.evaluation.condensation import spearman
from dispersion_jax.parallel import sharding
from dispersion_jax.training.train_step import eval_step


def validation_batches(cfg: ConfigDict, ds: PackedDataset, mesh) -> list[dict]:
  """The run's fixed validation batches (the same ones at every evaluation and on every topology)."""
  val = loader.ValidationBatches(
      ds, global_batch=cfg.batch_size // cfg.grad_accum, sharding=sharding.batch_sharding(mesh), read_threads=0
  )
  return list(val.iter_from(0, cfg.eval_batches))


def validation_metrics(eval_fn, params, batches) -> dict[str, float]:
  """Validation loss / perplexity / dispersion / condensation: the one definition, for training and `evaluate`."""
  totals = None
  for batch in batches:
    out = eval_fn(params, batch)
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  tokens = float(totals.pop("tokens"))
  val_loss = float(totals.pop("ce_sum")) / max(tokens, 1.0)
  result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0)), "tokens": tokens}
  if "dispersion_sum" not in totals:  # an eval step without the dispersion / condensation part
    return result
  n = float(totals.pop("batches"))
  result["val_dispersion"] = float(totals.pop("dispersion_sum")) / n
  means = {k: float(v) / n for k, v in totals.items() if k.startswith("condensation/mean_cos/")}
  result.update(means)
  result["condensation/spearman"] = spearman([means[k] for k in sorted(means, key=lambda s: int(s.rsplit("_", 1)[1]))])
  return result


def jit_eval_step(model, disp, mesh, param_shardings, with_dispersion: bool = True, lora_scale: float | None = None):
  """`param_shardings`: eval_params(shardings) of the run's state (a pair for LoRA, with lora_scale)."""
  return jax.jit(
      functools.partial(eval_step, model=model, disp=disp, with_dispersion=with_dispersion, lora_scale=lora_scale),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )
