"""Runs an omnisage HTTP app with uvicorn until SIGINT/SIGTERM; shared by every system's server.

The connection limits of limits.py apply (header size and count, read timeout, keep-alive,
connection cap), and binding an address other than loopback logs a warning.

Usage: `url, stopped_by = run_until_signal(app, "127.0.0.1", 8080, "serving {url}")`.
"""

import contextlib
import ipaddress
import logging
import signal
import socket
import threading

from omnisage.serving.service.limits import Limits, protocol_class

log = logging.getLogger("omnisage")


def uvicorn_config(app, host: str, port: int, limits: Limits | None = None):
  """The uvicorn.Config every omnisage server runs with (tests start servers with it too)."""
  import uvicorn
  limits = limits or Limits()
  # ws="none": no route speaks WebSocket, so an Upgrade request is served as plain HTTP.
  return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=5, http=protocol_class(limits), ws="none",
                        timeout_keep_alive=limits.keep_alive_s,
                        limit_concurrency=limits.max_connections)


def is_loopback(host: str) -> bool:
  """Whether every address `host` names is a loopback one ("0.0.0.0" and "::" are not)."""
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    pass
  try:   # a host name: what it resolves to
    infos = socket.getaddrinfo(host, None)
  except OSError:
    return False
  return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                             for info in infos)


def exposure_warning(host: str, authenticated: bool) -> str | None:
  """A warning when `host` is reachable from other machines, else None; logged on "omnisage"."""
  if is_loopback(host):
    return None
  warning = (f"WARNING: listening on {host}, not a loopback address: other machines can reach "
             "this service")
  if authenticated:
    warning += " (bearer-token authentication is on; the traffic is not encrypted)"
  else:
    warning += " without authentication (set --config.auth_token_file)"
  log.warning(warning)
  return warning


def run_until_signal(app, host: str, port: int, banner: str, limits: Limits | None = None,
                     authenticated: bool = False) -> tuple[str, str | None]:
  """Runs `app` with uvicorn on host:port until SIGINT/SIGTERM; returns (url, signal name or None).

  The socket is bound here, not in uvicorn: a busy port is a clear ValueError, not uvicorn's
  sys.exit(1). `banner` is logged with {url} filled in. `limits`: limits.py's (default Limits()).
  `authenticated`: whether the app requires a token (auth.py), for the exposure warning.
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
  server = uvicorn.Server(uvicorn_config(app, host, port, limits))
  warning = exposure_warning(host, authenticated)
  stopped_by = []
  with _quiet_signals(stopped_by):
    log.info(banner.format(url=url) + ("; " + warning if warning else "") + "; Ctrl-C stops")
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
