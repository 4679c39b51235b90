"""A Google Cloud Storage emulator for the tests: `gcp-storage-emulator` (the `test` extra) in this process, on a
free loopback port, with a switch to inject faults into its request handler (503s on writes, or a hang).

Every library of a run reaches it through the variables set by `environment()` (../shared/docs/object-storage.md):
google-cloud-storage and gcsfs (STORAGE_EMULATOR_HOST), TensorStore for Orbax's arrays (TENSORSTORE_GCS_HTTP_URL,
GOOGLE_AUTH_TOKEN_FOR_TESTING) and array_record's C++ client (CLOUD_STORAGE_EMULATOR_ENDPOINT). Nothing leaves
127.0.0.1.
"""

import contextlib
import io
import re
import socket
import threading
import time
import uuid

BUCKET = "dispersion-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  def __init__(self, bucket: str = BUCKET):
    from gcp_storage_emulator.server import create_server  # noqa: PLC0415 - the test extra

    self.bucket = bucket
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=bucket)
    self.fault = None  # None, or a function (method, path) -> HTTP status to answer instead (or None to pass)
    self.requests = 0
    self.lock = threading.Lock()
    self._wrap_handler()
    _threaded_server()
    _keep_generations()

  def _wrap_handler(self):
    """Its handler class, subclassed: each request first asks `self.fault` (no public hook exists for this)."""
    from gcp_storage_emulator import server as server_mod  # noqa: PLC0415

    emulator, base = self, getattr(server_mod.RequestHandler, "_dispersion_base", server_mod.RequestHandler)

    class Handler(base):
      _dispersion_base = base

      def _answer(self, method, original):
        emulator.requests += 1
        fault = emulator.fault
        status = fault(method, self.path) if fault else None
        if status is None:
          # The store is answered one request at a time (the emulator's own design), but the answer is sent
          # outside the lock: a client that streams an object and stops reading half-way (array_record's C++
          # reader opening a shard) must not stall every other client, as it would on a one-thread server.
          wfile, self.wfile = self.wfile, io.BytesIO()
          try:
            with emulator.lock:
              original(self)
            self.wfile, answer = wfile, self.wfile.getvalue()
            self.wfile.write(answer)
            self.wfile.flush()
          except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request
            pass
          finally:
            self.wfile = wfile
          return None
        if status == "hang":
          time.sleep(3600)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

      def do_GET(self):
        return self._answer("GET", base.do_GET)

      def do_POST(self):
        return self._answer("POST", base.do_POST)

      def do_PUT(self):
        return self._answer("PUT", base.do_PUT)

      def do_DELETE(self):
        return self._answer("DELETE", base.do_DELETE)

      def do_PATCH(self):
        return self._answer("PATCH", base.do_PATCH)

      def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    server_mod.RequestHandler = Handler  # APIThread.run looks the class up when the server thread starts

  def start(self) -> "Emulator":
    self._server.start()
    return self

  def stop(self) -> None:
    self._server.stop()

  def environment(self) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GOOGLE_CLOUD_PROJECT": "test",
    }

  def prefix(self, name: str = "run") -> str:
    """A fresh gs:// prefix in the test bucket."""
    return f"gs://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

  @contextlib.contextmanager
  def failing(self, fault):
    """Inject `fault` ((method, path) -> status or None) for the duration of the block."""
    self.fault = fault
    try:
      yield
    finally:
      self.fault = None


def _threaded_server() -> None:
  """The emulator's HTTP server with a thread per connection (its own is one thread: a single stalled connection
  would stop it), once per process. Its storage stays one request at a time (`Emulator.lock`)."""
  from http import server as http_server  # noqa: PLC0415

  from gcp_storage_emulator import server as server_mod  # noqa: PLC0415

  if getattr(server_mod.APIThread.run, "_dispersion", False):
    return

  def run(self):
    self._httpd = http_server.ThreadingHTTPServer((self._host, self._port), partial_handler(self._storage))
    self._httpd.daemon_threads = True
    self.is_running.set()
    self._httpd.serve_forever()

  def partial_handler(storage):
    return lambda *a, **kw: server_mod.RequestHandler(storage, *a, **kw)

  run._dispersion = True
  server_mod.APIThread.run = run


def _keep_generations() -> None:
  """Three things of the GCS API that the emulator lacks: the object's generation in the `x-goog-generation` header
  of a download (else TensorStore, Orbax's array store, reports "Malformed StorageGeneration" reading OCDBT
  manifests), the `ifGenerationMatch` precondition of an upload (OCDBT commits its manifest with it), and suffix
  ranges (`Range: bytes=-N`, with which array_record reads a shard's footer: the emulator sent the whole object).
  Added by wrapping two handlers of the emulator's route table, once per process."""
  import logging  # noqa: PLC0415

  from gcp_storage_emulator import server as server_mod  # noqa: PLC0415
  from gcp_storage_emulator.exceptions import NotFound  # noqa: PLC0415
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415

  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # "Resource not found" for every probe
  if getattr(objects.download, "_dispersion", False):
    return
  download, insert = objects.download, objects.insert

  def generation(storage, bucket, name) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def download_with_generation(request, response, storage, *args, **kw):
    headers = request._request_handler.headers  # private: the emulator has no API to rewrite a request
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("Range", ""))
    if suffix:  # "the last N bytes" (array_record reads a shard's footer so); the emulator parses only "a-b"
      try:
        size = int(storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])["size"])
      except NotFound:
        size = 0
      del headers["Range"]
      headers["Range"] = f"bytes={max(0, size - int(suffix.group(1)))}-{max(0, size - 1)}"
    gen = generation(storage, request.params["bucket_name"], request.params["object_id"])
    if gen != "0":
      response["x-goog-generation"] = gen
    return download(request, response, storage, *args, **kw)

  def insert_with_precondition(request, response, storage, *args, **kw):
    want = request.query.get("ifGenerationMatch")
    name = (request.query.get("name") or [None])[0]
    if want and name is not None:
      if generation(storage, request.params["bucket_name"], name) != want[0]:
        response.status = 412
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
    return insert(request, response, storage, *args, **kw)

  download_with_generation._dispersion = True
  objects.download, objects.insert = download_with_generation, insert_with_precondition
  for _, handlers in server_mod.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is download:
        handlers[method] = download_with_generation
      elif fn is insert:
        handlers[method] = insert_with_precondition


def writes_fail(status: int = 503):
  """A fault: every write (POST, PUT, PATCH, DELETE) answers `status`; reads pass."""
  return lambda method, path: status if method in ("POST", "PUT", "PATCH", "DELETE") else None
