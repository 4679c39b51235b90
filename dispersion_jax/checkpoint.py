"""Orbax checkpoints in WORKDIR/checkpoints: the train state, the data position and the run config (and, for LoRA
runs, `lora`: the resolved adapter setting and a fingerprint of the frozen base weights, which are not saved).

Orbax writes each step into a temporary directory and renames it when complete, so a `kill -9` at any moment
leaves only finished checkpoints behind (the temporary ones are ignored and cleaned up). The data position is a
small JSON (`data_state`: rows consumed + the dataset's fingerprint, data/loader.py), the same on every process,
so a checkpoint resumes on any process count. Checkpoints of earlier versions hold a Grain iterator item (`data`)
instead; it is not read (`data_state` returns None, and the loop resumes at step x batch).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dispersion_jax.errors import CheckpointError


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data_state": ocp.JsonCheckpointHandler(),
        "lora": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, cfg: dict, lora: dict | None = None) -> None:
    """`data_state`: the data position (JSON); `cfg`: the run config as a plain dict, the run's one record of it;
    `lora`: a LoRA run's adapter setting and base fingerprint (JSON)."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(cfg)}
    if data_state is not None:
      args["data_state"] = ocp.args.JsonSave(data_state)
    if lora is not None:
      args["lora"] = ocp.args.JsonSave(lora)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def data_state(self, step: int) -> dict | None:
    """The data position saved with `step`; None for a checkpoint without one (an earlier version's)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "data_state")):
      return None
    try:
      return self.manager.restore(step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore()))["data_state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} has no readable data state ({_first_line(e)}); "
          "delete that step directory to resume from an earlier one, or use a new --workdir"
      ) from e

  def lora(self, step: int) -> dict | None:
    """The LoRA record saved with `step`; None for a full fine-tuning checkpoint."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "lora")):
      return None
    try:
      return self.manager.restore(step, args=ocp.args.Composite(lora=ocp.args.JsonRestore()))["lora"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no readable LoRA record ({_first_line(e)})") from e

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the *current* shardings: any mesh works)."""
    self._check_shapes(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the user needs one line and a fix
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored ({_first_line(e)}); "
          "delete that step directory to resume from an earlier one, or use a new --workdir"
      ) from e
    return restored["state"]

  def saved_config(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no readable config ({_first_line(e)})") from e

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} is unreadable ({_first_line(e)}); "
          "delete that step directory or use a new --workdir"
      ) from e
    if saved is None:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no train state; use a new --workdir")
    want = _shapes(abstract_state)
    have = _shapes(saved)
    for key in sorted(set(want) | set(have)):
      if want.get(key) != have.get(key):
        raise CheckpointError(
            f"checkpoint in {self.directory} was written for another model shape ({key}: saved "
            f"{have.get(key, 'absent')}, config wants {want.get(key, 'absent')}); use a new --workdir or the "
            "run's original model config"
        )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(getattr(x, "shape", ())) for p, x in flat}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
