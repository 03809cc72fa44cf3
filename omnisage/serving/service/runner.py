"""Runs an omnisage HTTP app with uvicorn until SIGINT/SIGTERM; shared by every system's server.

Usage: `url, stopped_by = run_until_signal(app, "127.0.0.1", 8080, "serving {url}")`.
"""

import contextlib
import logging
import signal
import socket
import threading

log = logging.getLogger("omnisage")


def run_until_signal(app, host: str, port: int, banner: str) -> tuple[str, str | None]:
  """Runs `app` with uvicorn on host:port until SIGINT/SIGTERM; returns (url, signal name or None).

  The socket is bound here, not in uvicorn: a busy port is a clear ValueError, not uvicorn's
  sys.exit(1). `banner` is logged with {url} filled in. Shared by every omnisage server.
  """
  import uvicorn
  try:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as error:
    raise ValueError(f"cannot listen on {host}:{port}: {error}") from error
  port = sock.getsockname()[1]
  url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         access_log=False, timeout_graceful_shutdown=5))
  stopped_by = []
  with _quiet_signals(stopped_by):
    log.info(banner.format(url=url) + "; Ctrl-C stops")
    server.run(sockets=[sock])
  sock.close()
  return url, signal.Signals(stopped_by[0]).name if stopped_by else None


@contextlib.contextmanager
def _quiet_signals(stopped_by: list):
  """uvicorn handles SIGINT/SIGTERM as a graceful shutdown, then re-raises the signal through the
  handler that was installed before it: with Python's defaults that kills the process (SIGTERM)
  or raises KeyboardInterrupt (SIGINT) before launch.py can print its summary line. Installing a
  recording handler first makes that re-raise harmless."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  signals = (signal.SIGINT, signal.SIGTERM)
  previous = {sig: signal.signal(sig, lambda sig, frame: stopped_by.append(sig))
              for sig in signals}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
