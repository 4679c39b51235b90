"""Orbax checkpoints in WORKDIR/checkpoints: the train state, the data position and the run config (and, for LoRA
runs, `lora`: the resolved adapter setting and a fingerprint of the frozen base weights, which are not saved).

Orbax writes each step into a temporary directory and renames it when complete, so a `kill -9` at any moment
leaves only finished checkpoints behind (the temporary ones are ignored and cleaned up). In a bucket (gs://) there
is no rename: Orbax writes `commit_success.txt` into a step last, and a step without it is not listed (the previous
checkpoint stays the resume point). The data position is a
small JSON (`data_state`: rows consumed + the dataset's fingerprint, data/loader.py), the same on every process,
so a checkpoint resumes on any process count. Checkpoints of earlier versions hold a Grain iterator item (`data`)
instead; it is not read (`data_state` returns None, and the loop resumes at step x batch).

A storage that stops answering (a bucket outage) never hangs a run: a save (its blocking part and the wait for the
previous async save to commit) and a restore each get `timeout_s` (the run's `checkpoint_timeout_s`), after which
a StorageUnavailableError (one line, exit 75) ends the run. The calls run in a daemon thread that the caller stops
waiting for: Orbax does not bound its blocking calls or its restores, TensorStore retries a 503 up to 32 times, up
to 32 s apart, and gcsfs 6 times. Orbax's own bound of its async commit thread (`AsyncOptions.timeout_secs`) is set
a little later (ORBAX_SLACK_S), so that thread ends too, after our one line. A save that did
not commit has no `commit_success.txt` (in a bucket) or is still a temporary directory (on a disk), so it is never
taken for a checkpoint; the last complete one stays the resume point.
"""

import math
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from dispersion_jax.errors import CheckpointError, StorageUnavailableError, clean_message
from dispersion_jax.storage import paths

ORBAX_SLACK_S = 30  # seconds Orbax's async commit bound runs past checkpoint_timeout_s


class Checkpointer:
  """`writer=True` (training): creates WORKDIR/checkpoints and removes the temporary directories of killed saves.
  `writer=False` (every tool that only reads a run): creates nothing, and never touches the temporary directory of
  a save that a running training job may be writing. `timeout_s`: the bound of a save or restore (module doc)."""

  def __init__(
      self,
      workdir: str,
      max_to_keep: int | None = 3,
      async_save: bool = True,
      writer: bool = True,
      timeout_s: float = 600.0,
  ):
    self.directory = paths.join(paths.absolute(workdir, what="--workdir"), "checkpoints")
    self.timeout_s = timeout_s
    self._async, self._writer = async_save and writer, writer
    self._stuck = False  # a call outlived its bound: its thread may still hold Orbax, never wait for it again
    self._committed = self._pending = None  # the last step known complete; the step of the save in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=writer,
        cleanup_tmp_directories=writer,
        enable_async_checkpointing=self._async,
        # Orbax ends its commit thread a little after our bound: ours reports first, in one line (Orbax's own
        # timeout logs tracebacks through absl), and Orbax's keeps that thread from waiting on the storage forever.
        async_options=ocp.AsyncOptions(timeout_secs=math.ceil(timeout_s) + ORBAX_SLACK_S),
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data_state": ocp.JsonCheckpointHandler(),
        "lora": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  @classmethod
  def reader(cls, workdir: str) -> "Checkpointer":
    return cls(workdir, max_to_keep=None, writer=False)

  def latest_step(self) -> int | None:
    step = self.manager.latest_step()
    if self._pending is None:
      self._committed = step
    return step

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, cfg: dict, lora: dict | None = None) -> None:
    """`data_state`: the data position (JSON); `cfg`: the run config as a plain dict, the run's one record of it;
    `lora`: a LoRA run's adapter setting and base fingerprint (JSON)."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(cfg)}
    if data_state is not None:
      args["data_state"] = ocp.args.JsonSave(data_state)
    if lora is not None:
      args["lora"] = ocp.args.JsonSave(lora)
    composite = ocp.args.Composite(**args)
    self._bounded(f"saving checkpoint {step}", lambda: self.manager.save(step, args=composite, force=True))
    # Orbax's save first waits for the previous one to commit; an async save is complete after the next wait
    self._committed, self._pending = (self._pending if self._pending is not None else self._committed), step
    if not self._async:  # a synchronous save is complete when it returns
      self._committed, self._pending = step, None

  def data_state(self, step: int) -> dict | None:
    """The data position saved with `step`; None for a checkpoint without one (an earlier version's)."""
    if not paths.path(self.directory).joinpath(str(step), "data_state").exists():
      return None
    try:
      return self._read(step, data_state=ocp.args.JsonRestore())["data_state"]
    except StorageUnavailableError:
      raise
    except Exception as e:  # noqa: BLE001
      _quiet_abandoned_reads()
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} has no readable data state ({_first_line(e)}); "
          "delete that step directory to resume from an earlier one, or use a new --workdir"
      ) from e

  def lora(self, step: int) -> dict | None:
    """The LoRA record saved with `step`; None for a full fine-tuning checkpoint."""
    if not paths.path(self.directory).joinpath(str(step), "lora").exists():
      return None
    try:
      return self._read(step, lora=ocp.args.JsonRestore())["lora"]
    except StorageUnavailableError:
      raise
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no readable LoRA record ({_first_line(e)})") from e

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the *current* shardings: any mesh works)."""
    self._check_shapes(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    try:
      restored = self._read(step, **args)
    except StorageUnavailableError:
      raise
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the user needs one line and a fix
      _quiet_abandoned_reads()
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored ({_first_line(e)}); "
          "delete that step directory to resume from an earlier one, or use a new --workdir"
      ) from e
    return restored["state"]

  def saved_config(self, step: int) -> dict:
    try:
      return self._read(step, config=ocp.args.JsonRestore())["config"]
    except StorageUnavailableError:
      raise
    except Exception as e:  # noqa: BLE001
      _quiet_abandoned_reads()
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} has no readable config ({_first_line(e)}); delete that step "
          "directory to resume from an earlier one, or use a new --workdir"
      ) from e

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    try:
      saved = self._bounded(f"reading checkpoint {step}", lambda: self.manager.item_metadata(step), save=False)["state"]
    except StorageUnavailableError:
      raise
    except Exception as e:  # noqa: BLE001
      _quiet_abandoned_reads()
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

  def _read(self, step: int, **items) -> Any:
    """Orbax's restore of `items` of checkpoint `step`, within the bound."""
    composite = ocp.args.Composite(**items)
    return self._bounded(f"restoring checkpoint {step}", lambda: self.manager.restore(step, args=composite), save=False)

  def wait(self) -> None:
    self._bounded("waiting for the last checkpoint save", self.manager.wait_until_finished)
    self._committed, self._pending = (self._pending if self._pending is not None else self._committed), None

  def _bounded(self, what: str, call, *, save: bool = True):
    """`call()` within `timeout_s`, or a StorageUnavailableError. A save that fails (Orbax's own commit timeout, a
    storage error after the libraries' retries) is one too: a failed save is the storage's failure."""
    if self._stuck:
      raise StorageUnavailableError(f"{what} in {self.directory}: an earlier checkpoint call never returned")
    box: dict = {}
    done = threading.Event()

    def target():
      try:
        box["value"] = call()
      except BaseException as e:  # noqa: BLE001 - handed to the caller
        box["error"] = e
      finally:
        done.set()

    threading.Thread(target=target, name="checkpoint-call", daemon=True).start()
    if not done.wait(self.timeout_s):
      self._stuck = True
      raise StorageUnavailableError(self._unavailable(f"{what} did not finish within {self.timeout_s:g} s"))
    if "error" in box:
      e = box["error"]
      if save and isinstance(e, Exception) and not isinstance(e, CheckpointError):
        self._stuck = True
        raise StorageUnavailableError(self._unavailable(f"{what} failed ({_first_line(e)})")) from e
      raise e
    return box.get("value")

  def _unavailable(self, what: str) -> str:
    last = f"step {self._committed}" if self._committed is not None else "the last complete checkpoint"
    if not self._writer:  # a tool reading a run: no run config of its own to raise the bound in
      return f"{what} in {self.directory}: the storage does not answer; re-run once it works again"
    return (
        f"{what} in {self.directory}: the storage does not answer; the run resumes from {last}: re-run the same "
        "command once the storage works again (or raise --config.checkpoint_timeout_s for slow storage)"
    )

  def close(self) -> None:
    if self._stuck:  # the storage does not answer: waiting for the pending save would hang (the run is ending)
      return
    self._bounded("waiting for the last checkpoint save", self.manager.wait_until_finished)
    # The clean-up of temporary directories runs in a thread from the manager's creation until the first save;
    # wait for it, or an exit right after (an error) makes it log a traceback about a shut-down executor.
    pending = getattr(self.manager, "_cleanup_tmp_directory_future", None)  # private: no public wait for it
    if pending is not None:
      try:
        pending.result()
      except Exception:  # noqa: BLE001 - a failed clean-up of leftovers is no reason to fail the run
        pass
    self.manager.close()


def _quiet_abandoned_reads() -> None:
  """After a failed restore, the reads of the other arrays are abandoned: when they finish, TensorStore calls back
  into Orbax's closed event loop, and Python reports each one as an unraisable exception (`RuntimeError: Event loop
  is closed`, `Exception ignored in: <coroutine object _read_array_index_and_device_put ...>`), tracebacks that
  would follow the one-line error. Drop those, and only those."""
  previous = sys.unraisablehook
  if getattr(previous, "_dispersion_quiet", False):
    return

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        code is not None and ("orbax" in code.co_filename or "tensorstore" in code.co_filename)
    ):
      return
    previous(unraisable)

  hook._dispersion_quiet = True
  sys.unraisablehook = hook


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(getattr(x, "shape", ())) for p, x in flat}


def _first_line(e: BaseException) -> str:
  """The most specific line of a library failure: the innermost cause's message (Orbax wraps TensorStore's, which
  names the array and the file), its first line, cleaned of object reprs, at most 300 characters."""
  inner, seen = e, {id(e)}
  while True:
    nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
    if nxt is None or id(nxt) in seen:
      break
    inner = nxt
    seen.add(id(inner))
  text = clean_message(str(inner)).splitlines()
  return f"{type(inner).__name__}: {text[0][:300]}" if text else type(inner).__name__
