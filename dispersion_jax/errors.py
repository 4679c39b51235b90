"""The project's user-facing errors: each message is one line that names the setting or input and the fix.

A leaf module (it imports nothing of the package), so every layer can raise them; the command-line layer prints
them as `error: <message>` and exits with code 2.
"""

import re


class UserError(ValueError):
  """Base class: bad input from the user (a setting, a file, a checkpoint), reported as one line."""


class ConfigError(UserError):
  """A bad configuration key, value or combination."""


class DataError(UserError):
  """Missing, unreadable or mismatched data (cache, input files, dataset fingerprint)."""


class DatasetNotBuiltError(DataError):
  """No built dataset for a run's data settings: the message ends with the command that builds it, which a command
  line tool replaces with the user's own (`with_command`)."""

  def __init__(self, what: str, command: str):
    self.what, self.command = what, command
    super().__init__(f"{what}; build it with `{command}`")

  def with_command(self, command: str) -> "DatasetNotBuiltError":
    return DatasetNotBuiltError(self.what, command)


class CheckpointError(UserError):
  """A checkpoint that cannot be restored into this run."""


class TrainingError(UserError):
  """A run that cannot go on (e.g. a non-finite loss)."""


class StorageUnavailableError(Exception):
  """The storage of a run (a bucket, a disk) did not complete a checkpoint save or restore within its bound
  (`checkpoint_timeout_s`), or refused a write of the run's history after its library's retries. Not the user's
  input: the command line prints it as one line `error: ...` and exits 75 (try again later), as an interruption
  does; the last complete checkpoint stays the resume point."""


def describe_failure(ex: BaseException) -> str:
  """An unexpected exception as `Type: first line` (at most 300 characters of it): how a benchmark records a point
  that failed while the other points go on."""
  return f"{type(ex).__name__}: {(clean_message(str(ex)).splitlines() or [''])[0][:300]}"


# An object's repr inside a message: <bound method f of X(...)>, <function f at 0x..>, <Foo object at 0x..>.
_REPR = re.compile(r"<(?:bound method|built-in method|function|coroutine object|[\w.]+ object)\b[^>]*>?")


def clean_message(text: str) -> str:
  """`text` without object reprs (libraries that embed an object, e.g. TensorStore's `<bound method ... of
  TensorStore({...})>`, instead of its text): the user reads the part that names the file and the problem."""
  text = _REPR.sub("", text)
  text = re.sub(r"See full TensorStore details:\s*\.?", "", text)
  return "\n".join(line.rstrip() for line in text.strip().splitlines())
