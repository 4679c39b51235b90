"""The project's user-facing errors: each message is one line that names the setting or input and the fix.

A leaf module (it imports nothing of the package), so every layer can raise them; the command-line layer prints
them as `error: <message>` and exits with code 2.
"""


class UserError(ValueError):
  """Base class: bad input from the user (a setting, a file, a checkpoint), reported as one line."""


class ConfigError(UserError):
  """A bad configuration key, value or combination."""


class DataError(UserError):
  """Missing, unreadable or mismatched data (cache, input files, dataset fingerprint)."""


class CheckpointError(UserError):
  """A checkpoint that cannot be restored into this run."""


class TrainingError(UserError):
  """A run that cannot go on (e.g. a non-finite loss)."""


def describe_failure(ex: BaseException) -> str:
  """An unexpected exception as `Type: first line` (at most 300 characters of it): how a benchmark records a point
  that failed while the other points go on."""
  return f"{type(ex).__name__}: {(str(ex).splitlines() or [''])[0][:300]}"
