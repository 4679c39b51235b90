"""Orbax checkpoints of the train state, the Grain iterator state and the config, in WORKDIR/checkpoints.

Orbax writes each step into a temporary directory and renames it when complete, so a `kill -9` at any moment
leaves only finished checkpoints behind (the temporary ones are ignored and cleaned up).
"""
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message is one line naming the fix."""


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, cfg: ConfigDict) -> None:
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(cfg.to_dict())}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the *current* shardings: any mesh works)."""
    self._check_shapes(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the user needs one line and a fix
      raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored ({_first_line(e)}); "
                            "delete that step directory to resume from an earlier one, or use a new --workdir") from e
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
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({_first_line(e)}); "
                            "delete that step directory or use a new --workdir") from e
    if saved is None:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no train state; use a new --workdir")
    want = _shapes(abstract_state)
    have = _shapes(saved)
    for key in sorted(set(want) | set(have)):
      if want.get(key) != have.get(key):
        raise CheckpointError(
            f"checkpoint in {self.directory} was written for another model shape ({key}: saved "
            f"{have.get(key, 'absent')}, config wants {want.get(key, 'absent')}); use a new --workdir or the "
            "run's original model config")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in flat}


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_params(workdir: str, step: int | None = None):
  """(GPTConfig, params) of a training run's checkpoint, on the default device (for evaluation tools)."""
  from dispersion_jax import config as config_lib
  from dispersion_jax.train_step import init_state, make_optimizer
  ckpt = Checkpointer(workdir, max_to_keep=None, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise CheckpointError(f"no checkpoint {'' if step is None else step} in {ckpt.directory}; "
                          "train first or pass an existing --step")
  cfg = config_lib.default_config()
  cfg.update_from_flattened_dict(_flatten(ckpt.saved_config(step)))
  model_cfg = config_lib.model_config(cfg)
  tx = make_optimizer(cfg)
  abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, 0))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  state = ckpt.restore(step, abstract)
  ckpt.close()
  return model_cfg, state.params


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out
