"""Where metrics go: TensorBoard, WORKDIR/metrics.jsonl (one JSON object per logged step) and a tqdm bar."""

import json
import math
import os
from typing import Mapping

import numpy as np
import tqdm


class MetricsLogger:
  """Host-side sink; only the lead process writes (`enabled`)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True, progress: bool = True):
    self.enabled = enabled
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (enabled and progress),
        mininterval=1.0,
    )
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def advance(self, steps: int = 1) -> None:
    self._bar.update(steps)

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    shown = {k: scalars[k] for k in ("loss", "ce", "dispersion", "val_loss") if k in scalars}
    if shown:
      self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)

  def write(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text)

  def close(self) -> None:
    self._bar.close()
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _scalar(v) -> float:
  x = float(np.asarray(v))
  return x if math.isfinite(x) else float("nan")
