"""Is a bucket usable? Checked before anything is compiled or written, with a bound on the time it may take.

A missing bucket or one this account cannot write becomes one line naming the path and the fix, instead of a
traceback after compiling (or, as MaxText notes, an `epath.Path('gs://no_such_bucket/...').mkdir()` that hangs).
"""

import concurrent.futures
import os
import uuid

from dispersion_jax.errors import ConfigError
from dispersion_jax.storage import paths

CHECK_TIMEOUT_S = 60.0


def check_writable(where: str | os.PathLike, *, what: str = "--workdir", timeout_s: float = CHECK_TIMEOUT_S) -> None:
  """For a gs:// `where`: writes and deletes one small probe object under it, within `timeout_s`; a ConfigError
  (one line) if the bucket does not exist, cannot be written or does not answer. Local paths: nothing to check."""
  if not paths.is_remote(where):
    return
  probe = paths.path(where, what=what).joinpath(f".write-probe-{uuid.uuid4().hex}")

  def write_and_delete():
    probe.write_text("probe")
    probe.unlink()

  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bucket-check")
  try:
    pool.submit(write_and_delete).result(timeout=timeout_s)
  except concurrent.futures.TimeoutError:
    raise ConfigError(
        f"{what}={where}: the bucket did not answer a test write within {timeout_s:.0f} s; check the network and "
        "credentials (gcloud auth application-default login) or use a local path"
    ) from None
  except Exception as e:  # noqa: BLE001 - gcsfs raises FileNotFoundError, PermissionError, HttpError, ...
    text = " ".join(str(e).split())[:200]
    hint = "does the bucket exist? create it (gcloud storage buckets create gs://BUCKET) or fix the name"
    if isinstance(e, PermissionError) or "403" in text or "401" in text:
      hint = "this account cannot write there; grant it roles/storage.objectAdmin or use another bucket"
    raise ConfigError(f"{what}={where}: cannot write to the bucket ({type(e).__name__}: {text}); {hint}") from None
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
