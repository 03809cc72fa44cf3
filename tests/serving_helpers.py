"""Shared by test_server.py and test_search_page.py: a small real index from the tiny bundle, and
a uvicorn server on a loopback port in a background thread."""

import contextlib
import os
import socket
import threading
import time

from omnisage.serving.index.embed import KINDS, embed_entities
from omnisage.serving.index.scann_index import build_index


def build_tiny_index(tiny_bundle, out_root) -> tuple[str, str, str]:
  """(bundle dir, embeddings dir, index dir): every tiny entity embedded and indexed."""
  _, prepared, _, bundle, _ = tiny_bundle
  embeddings = os.path.join(out_root, "embeddings")
  for kind in KINDS:
    embed_entities(bundle, os.path.join(prepared, "entities", f"{kind}.parquet"), embeddings)
  index = os.path.join(out_root, "index")
  build_index(embeddings, index, target_recall=0.95, qps_seconds=0.05)
  return bundle, embeddings, index


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def running(app):
  """Serves `app` on 127.0.0.1:<free port> in a thread; yields the base URL (no trailing /)."""
  import uvicorn
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         access_log=False))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)
    sock.close()
