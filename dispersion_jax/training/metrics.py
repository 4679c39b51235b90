"""Where metrics go: TensorBoard, WORKDIR/metrics.jsonl (one JSON object per logged step) and a tqdm bar.

In a bucket (gs:// workdir) nothing is appended (an append replaces a gs:// object): the history is the chunk
objects of WORKDIR/metrics.jsonl.d/ (storage/lines.py), read and rewound the same way, and TensorBoard's event
files are written locally and uploaded whole at every checkpoint and at the end (storage/transfer.Mirror): what a
crash loses are the events after the last checkpoint, which the resumed run writes again.

metrics.jsonl holds one history: rows `{"step", "kind", ...}` with kind `train` (every log_every steps) or `eval`
(every eval_every steps), each (step, kind) once. A run that resumes from the checkpoint of step S first rewrites the
file (atomically) to the rows of steps <= S: what a killed run logged after its last checkpoint, or after the
checkpoint a user resumed from, is computed again and must not appear twice. TensorBoard drops the same steps
(`purge_step`). A resume that dropped rows or changed a setting adds one row `{"step": S, "kind": "resume",
"discarded_rows": n, "discarded_through": T, "changed": {key: [old, new]}, "restarts": k}` (a later restart from
the same step updates it); readers of the history skip it (`read_history`).
"""

import json
import math
import shutil
from typing import Mapping

import numpy as np
import tqdm

from dispersion_jax.errors import StorageUnavailableError, clean_message
from dispersion_jax.storage import lines, paths, transfer

FILE = "metrics.jsonl"
KINDS = ("train", "eval")
RESUME = "resume"


def row_kind(row: Mapping) -> str | None:
  """A row's kind; rows written before kinds existed: eval if it has val_loss, train if it has loss."""
  if "kind" in row:
    return row["kind"]
  return "eval" if "val_loss" in row else "train" if "loss" in row else None


def history_location(workdir: str) -> str:
  """The run's metrics history: WORKDIR/metrics.jsonl, or in a bucket the folder of its chunks (storage/lines.py)."""
  return lines.location(workdir, FILE)


def _read_rows(log: lines.LineLog) -> tuple[list[dict], bool]:
  """(the rows of a metrics history, whether every line was a whole row). A line cut short by a kill (or otherwise
  unreadable) is skipped."""
  rows, whole = [], True
  for line in log.read_lines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int) and line.endswith("\n"):
      rows.append(row)
    elif line.strip():
      whole = False
  return rows, whole


def read_history(workdir: str) -> dict[str, dict[int, dict]]:
  """{kind: {step: row}} for kinds train and eval: the run's one history. Resume rows are skipped; in a file of an
  earlier version (which appended the rows of a resumed run after the discarded ones), the last row of a
  (step, kind) wins, as the resumed run's."""
  out: dict[str, dict[int, dict]] = {k: {} for k in KINDS}
  for row in _read_rows(lines.LineLog(history_location(workdir)))[0]:
    kind = row_kind(row)
    if kind in out:
      out[kind][row["step"]] = row
  return out


def rewind(log: "lines.LineLog | str", step: int) -> tuple[list[dict], dict | None]:
  """Rewrites the metrics history (a LineLog, or the location of one) to its rows of steps <= `step` (atomically:
  a kill leaves the old history or the new one). Returns (the train/eval rows dropped, the resume row of `step` if
  any: it is taken out to be updated)."""
  log = log if isinstance(log, lines.LineLog) else lines.LineLog(log)
  rows, whole = _read_rows(log)
  keep, dropped, previous = [], [], None
  for row in rows:
    if row_kind(row) == RESUME and row["step"] == step:
      previous = row
    elif row["step"] <= step:
      keep.append(row)
    elif row_kind(row) in KINDS:
      dropped.append(row)
  if not log.exists() or (whole and len(keep) == len(rows)):
    return dropped, previous  # nothing to drop: leave the history as it is
  log.replace([json.dumps(r) + "\n" for r in keep])
  return dropped, previous


class MetricsLogger:
  """Host-side sink; only the lead process writes (`enabled`). Opening it at `start_step` rewinds the history to
  that step (see the module docstring)."""

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
    self.dropped: list[dict] = []
    self._previous_resume = None
    self._log = lines.LineLog(history_location(workdir))
    if enabled:
      self.dropped, self._previous_resume = rewind(self._log, start_step)
    # Every process reads what the history holds up to the start (the workdir is shared): decisions taken on it
    # (train.py's evaluation of a checkpoint that has none yet) must be the same on all of them.
    self._logged = {(r["step"], row_kind(r)) for r in _read_rows(self._log)[0] if r["step"] <= start_step}
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    # TensorBoard hides the events of steps >= purge_step written before this session: the same history.
    self._tb_dir = transfer.Mirror(paths.join(workdir, "tensorboard"))
    self._tb = SummaryWriter(self._tb_dir.local, purge_step=start_step + 1)
    self._log.open_for_append()

  def has(self, step: int, kind: str) -> bool:
    """Whether the history holds a row of this (step, kind)."""
    return (step, kind) in self._logged

  def record_resume(self, step: int, changed: Mapping[str, tuple] | None = None) -> dict | None:
    """Adds the resume row of a restart from `step` if it dropped rows or changed settings (`changed`: key ->
    (old, new)); returns it (None when there was nothing to record)."""
    prev = self._previous_resume or {}
    merged = dict(prev.get("changed", {}))
    for key, (old, new) in (changed or {}).items():  # a repeated change keeps the value before the first one
      merged[key] = [merged[key][0] if key in merged else old, new]
    through = [r["step"] for r in self.dropped] + [t for t in [prev.get("discarded_through")] if t is not None]
    if not (self.dropped or changed or prev):
      return None
    row = {
        "step": step,
        "kind": RESUME,
        "discarded_rows": len(self.dropped) + prev.get("discarded_rows", 0),
        "discarded_through": max(through, default=None),
        "changed": merged,
        "restarts": prev.get("restarts", 0) + 1,
    }
    if self.enabled:
      self._log.append(json.dumps(row) + "\n")
      self._logged.add((step, RESUME))
    return row

  def advance(self, steps: int = 1) -> None:
    self._bar.update(steps)

  def log(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._log.append(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")
    self._logged.add((step, kind))
    shown = {k: scalars[k] for k in ("loss", "ce", "dispersion", "val_loss") if k in scalars}
    if shown:
      self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)

  def flush(self) -> None:
    """TensorBoard's events so far to their file (in a bucket: one upload of the whole event file)."""
    if self.enabled:
      self._tb.flush()
      self._upload()

  def _upload(self) -> None:
    """The mirrored TensorBoard directory to the bucket. An upload that still fails after gcsfs's retries is a
    StorageUnavailableError (one line, exit 75)."""
    try:
      self._tb_dir.sync()
    except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError, OSError, ...; the user needs one line
      text = " ".join(clean_message(str(e)).split())[:200]
      raise StorageUnavailableError(
          f"uploading the TensorBoard events to {self._tb_dir.dest} failed ({type(e).__name__}: {text}): the "
          "storage does not answer; re-run the same command once it works again (the run resumes from its last "
          "complete checkpoint)"
      ) from e

  def write(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text)

  def close(self, upload: bool = True) -> None:
    """`upload=False`: the bucket does not answer (the run is ending on a StorageUnavailableError): the local copy
    of the TensorBoard events is dropped instead of uploaded (an upload would add gcsfs's retries to the exit; the
    resumed run writes the events after its checkpoint again, purge_step)."""
    self._bar.close()
    if self.enabled:
      self._tb.close()
      if not self._tb_dir.remote:
        self._tb_dir.close()
      else:
        try:
          if upload:
            self._upload()
        finally:
          shutil.rmtree(self._tb_dir.local, ignore_errors=True)
      self._log.close()


def _scalar(v) -> float:
  x = float(np.asarray(v))
  return x if math.isfinite(x) else float("nan")
