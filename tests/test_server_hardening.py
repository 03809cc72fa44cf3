"""Hardening of the query service (omnisage/serving/service/limits.py, auth.py, runner.py) on real
uvicorn servers on loopback, started with the runner's own uvicorn config: header size and count
limits, the read timeout against slow clients, keep-alive limits, the connection cap, bearer-token
authentication (OmniSearchSage and two-tower + PinnerSage apps), the warning for a non-loopback
address, and queries of only invisible characters.
"""

import contextlib
import json
import logging
import select
import signal
import socket
import subprocess
import sys
import time
import types

import httpx
import numpy as np
import pytest

from omnisage.cli_compat import translate_argv
from omnisage.serving.bundle.loader import load_bundle
from omnisage.serving.index.scann_index import load_index
from omnisage.serving.omnisearchsage.service import create_app
from omnisage.serving.service import auth, runner
from omnisage.serving.service.limits import Limits
from tests.helpers import ROOT, build_tiny_index, free_port, running, subprocess_env

TOKEN = "s3cret-token-\u00e9"   # non-ASCII too: compared as UTF-8 bytes
BEARER = ("Bearer " + TOKEN).encode()   # the Authorization header (httpx sends str as ASCII)
# The limits of the `server` fixture: small, so the tests are quick.
TEST_LIMITS = dict(max_header_bytes=8192, max_headers=20, read_timeout_s=1.0, keep_alive_s=3.0,
                   max_keep_alive_requests=3)


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory):
  from omnisage.data.tokenizer import WordPieceTokenizer
  bundle_dir, _, index_dir = build_tiny_index(tiny_bundle, tmp_path_factory.mktemp("idx"))
  bundle = load_bundle(bundle_dir)
  return dict(bundle_dir=bundle_dir, index_dir=index_dir, bundle=bundle,
              tokenizer=WordPieceTokenizer.from_bundle(bundle), indexes=load_index(index_dir))


def make_app(world, **options):
  # No warm-up: the tower compiles on its first batch; most tests here never reach it.
  return create_app(world["bundle"], world["indexes"], tokenizer=world["tokenizer"],
                    **{"max_batch": 8, "warmup": False, **options})


@contextlib.contextmanager
def serving(app, **limits):
  """Serves `app` on 127.0.0.1:<free port> with runner.uvicorn_config (the production limits);
  yields the port."""
  config = lambda app, host, port: runner.uvicorn_config(app, host, port, Limits(**limits))
  with running(app, config) as url:
    yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def server(world):
  with serving(make_app(world), **TEST_LIMITS) as port:
    yield port


# --- raw HTTP on a socket ------------------------------------------------------------------------

def connect(port) -> socket.socket:
  sock = socket.create_connection(("127.0.0.1", port), timeout=20)
  sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  return sock


def read_until_closed(sock, limit_s=20.0) -> tuple[bytes, bool]:
  """Everything the server sends until it closes: (bytes, reset). reset: the close was an RST
  (the server closed with our bytes still unread, which may also drop its response)."""
  chunks, deadline = [], time.time() + limit_s
  while True:
    sock.settimeout(max(0.01, deadline - time.time()))
    try:
      chunk = sock.recv(65536)
    except ConnectionResetError:
      return b"".join(chunks), True
    except TimeoutError:
      raise AssertionError(f"the server kept the connection open for {limit_s} s") from None
    if not chunk:
      return b"".join(chunks), False
    chunks.append(chunk)


def parse(response: bytes) -> tuple[int, dict, bytes]:
  """(status, lower-cased headers, body) of one HTTP/1.1 response."""
  head, _, body = response.partition(b"\r\n\r\n")
  lines = head.decode("latin-1").split("\r\n")
  headers = dict(line.lower().split(": ", 1) for line in lines[1:])
  return int(lines[0].split()[1]), headers, body


def read_one(sock) -> tuple[int, dict, bytes]:
  """One response on a keep-alive connection: the head, then Content-Length bytes of body."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = sock.recv(65536)
    assert chunk, f"closed before a whole response: {data[:200]}"
    data += chunk
  status, headers, body = parse(data)
  while len(body) < int(headers["content-length"]):
    body += sock.recv(65536)
  return status, headers, body


def request_bytes(path="/healthz", headers=(), method="GET", body=b"") -> bytes:
  lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
  if body:
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
  return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def one_request(port, data: bytes) -> tuple[int, dict, bytes]:
  """`data` on a fresh connection; the one response (the server must close after it)."""
  with connect(port) as sock:
    sock.sendall(data)
    response, _ = read_until_closed(sock)
  return parse(response)


def error_of(body: bytes) -> dict:
  error = json.loads(body)["error"]
  assert set(error) == {"code", "message", "field"} and error["message"]
  return error


# --- header size and count -----------------------------------------------------------------------

def test_headers_over_the_byte_limit_get_431(server):
  big = request_bytes(headers=["X-Big: " + "a" * 2 * TEST_LIMITS["max_header_bytes"]])
  status, headers, body = one_request(server, big)   # and the server closes the connection
  assert status == 431 and headers["connection"] == "close"
  assert error_of(body)["code"] == "headers_too_large"
  # Just under the limit is served.
  fits = request_bytes(headers=["X-Big: " + "a" * (TEST_LIMITS["max_header_bytes"] - 200),
                                "Connection: close"])
  assert one_request(server, fits)[0] == 200


def test_a_16_mb_header_is_not_answered_200(server):
  """The tester's case: the server refuses after about max_header_bytes (+ one socket read),
  without reading, buffering or answering the 16 MB."""
  data = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n"
  sent, t0 = 0, time.perf_counter()
  with connect(server) as sock:
    try:
      while sent < len(data):
        sent += sock.send(data[sent:sent + 65536])
    except (BrokenPipeError, ConnectionResetError):
      pass
    response, reset = read_until_closed(sock)
  seconds = time.perf_counter() - t0
  # The 431 is on the wire before the close; an RST (our unread bytes) may discard it on the way.
  assert response.startswith(b"HTTP/1.1 431") or (reset and not response), response[:200]
  assert sent < len(data), "all 16 MB were accepted"
  assert seconds < 5
  print(f"16 MB header: refused after {sent / 1e6:.2f} MB sent in {seconds:.2f} s "
        f"({'431' if response else 'connection reset'})")
  with connect(server) as sock:   # still serving
    sock.sendall(request_bytes(headers=["Connection: close"]))
    assert parse(read_until_closed(sock)[0])[0] == 200


def test_more_headers_than_the_limit_get_431(server):
  limit = TEST_LIMITS["max_headers"]
  # Host and Connection count: `limit` header lines in all are served, one more is refused.
  at_limit = [f"X-H{i}: v" for i in range(limit - 2)] + ["Connection: close"]
  assert one_request(server, request_bytes(headers=at_limit))[0] == 200
  status, _, body = one_request(server, request_bytes(headers=[f"X-H{i}: v" for i in range(limit)]))
  assert status == 431 and error_of(body)["code"] == "headers_too_large"
  # 10,000 tiny headers (each under the byte limit's radar) in several reads: refused as well.
  many = request_bytes(headers=[f"X{i}: v" for i in range(10_000)])
  with connect(server) as sock:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
      for start in range(0, len(many), 4096):
        sock.sendall(many[start:start + 4096])
    response, reset = read_until_closed(sock)
  assert response.startswith(b"HTTP/1.1 431") or (reset and not response), response[:200]


# --- slow clients --------------------------------------------------------------------------------

def test_a_client_that_sends_half_a_header_is_disconnected(server):
  timeout = TEST_LIMITS["read_timeout_s"]
  with connect(server) as sock:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")
    t0 = time.perf_counter()
    response, _ = read_until_closed(sock, limit_s=10)
    held = time.perf_counter() - t0
  status, headers, body = parse(response)
  assert status == 408 and error_of(body)["code"] == "request_timeout"
  assert timeout * 0.9 <= held < timeout + 1.5, held
  print(f"half a header: disconnected after {held:.2f} s (read_timeout_s={timeout})")


def test_a_connection_that_sends_nothing_is_closed(server):
  with connect(server) as sock:
    t0 = time.perf_counter()
    response, _ = read_until_closed(sock, limit_s=10)
    held = time.perf_counter() - t0
  assert parse(response)[0] == 408
  assert held < TEST_LIMITS["read_timeout_s"] + 1.5, held


def test_a_trickling_client_is_disconnected_at_the_deadline(server):
  """Slowloris: a byte every 0.2 s never completes the headers; each byte must not restart the
  clock (uvicorn's own keep-alive timer does restart on every read)."""
  timeout = TEST_LIMITS["read_timeout_s"]
  with connect(server) as sock:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    t0 = time.perf_counter()
    closed = False
    while time.perf_counter() - t0 < 10 and not closed:
      try:
        sock.send(b"a")
      except (BrokenPipeError, ConnectionResetError):
        break
      if select.select([sock], [], [], 0.2)[0]:
        closed = True
    held = time.perf_counter() - t0
  assert held < timeout + 1.5, f"still connected after {held:.1f} s"


def test_a_slow_body_is_disconnected(server):
  with connect(server) as sock:
    sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"query\"")
    t0 = time.perf_counter()
    response, _ = read_until_closed(sock, limit_s=10)
    held = time.perf_counter() - t0
  assert not response.startswith(b"HTTP/1.1 200")
  assert held < TEST_LIMITS["read_timeout_s"] + 1.5, held


def test_keep_alive_idle_and_request_limits(server):
  """An idle keep-alive connection outlives read_timeout_s (the read clock only runs during a
  request) and is closed after keep_alive_s; the max_keep_alive_requests-th answer closes it."""
  with connect(server) as sock:
    for i in range(TEST_LIMITS["max_keep_alive_requests"]):
      if i == 1:
        time.sleep(TEST_LIMITS["read_timeout_s"] * 1.5)
      sock.sendall(request_bytes())
      status, headers, _ = read_one(sock)
      assert status == 200
      last = i == TEST_LIMITS["max_keep_alive_requests"] - 1
      assert (headers.get("connection") == "close") == last, (i, headers)
    assert read_until_closed(sock, limit_s=5)[0] == b""   # closed right after the last answer
  with connect(server) as sock:
    sock.sendall(request_bytes())
    assert read_one(sock)[0] == 200
    t0 = time.perf_counter()
    read_until_closed(sock, limit_s=10)
    idle = time.perf_counter() - t0
  assert TEST_LIMITS["keep_alive_s"] - 1 < idle < TEST_LIMITS["keep_alive_s"] + 1.5, idle


# --- connection cap ------------------------------------------------------------------------------

def test_connections_beyond_the_cap_get_503(world):
  cap = 4
  with serving(make_app(world), max_connections=cap, read_timeout_s=30) as port:
    held = []
    for _ in range(cap):   # keep-alive connections up to the cap (the cap-th too) are served
      sock = connect(port)
      sock.sendall(request_bytes())
      assert read_one(sock)[0] == 200
      held.append(sock)
    status, headers, body = one_request(port, request_bytes())   # cap + 1 open: refused, closed
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert error_of(body)["code"] == "overloaded"
    for sock in held:
      sock.close()
    deadline = time.time() + 5
    while one_request(port, request_bytes(headers=["Connection: close"]))[0] != 200:
      assert time.time() < deadline, "not served again after the connections closed"
      time.sleep(0.05)


# --- authentication ------------------------------------------------------------------------------

def test_bearer_token_on_the_query_service(world):
  app = make_app(world, auth_token=TOKEN)
  with serving(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
    right = {"Authorization": BEARER}
    for path in ("/v1/search", "/v1/embed"):
      wrong = ["Bearer wrong", b"Basic " + BEARER[7:], BEARER[:-1], "Bearer", "Bearer " + "x" * 64]
      for headers in [{}] + [{"Authorization": value} for value in wrong]:
        r = c.post(path, json={"query": "cake", "queries": ["cake"]}, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert error_of(r.content)["code"] == "unauthorized"
    for path in ("/metrics", "/", "/openapi.json", "/docs", "/no/such/path"):
      assert c.get(path).status_code == 401, path
    r = c.post("/v1/search", json={"query": "cake", "k": 2}, headers=right)
    assert r.status_code == 200, r.text
    assert c.post("/v1/search", json={"query": "cake"},
                  headers={"authorization": b"bearer " + BEARER[7:]}).status_code == 200
    assert c.get("/metrics", headers=right).status_code == 200
    assert c.get("/healthz").status_code == 200   # liveness probes need no token
    assert c.get("/healthz").json()["status"] == "ok"
    # A stranger's 401 is counted by /metrics like any other answer.
    assert 'status="401"' in c.get("/metrics", headers=right).text


def test_bearer_token_on_the_recommend_and_pinnersage_routes():
  from omnisage.serving.pinnersage.batch import Items
  from omnisage.serving.pinnersage.service import PinnerSageService, pinnersage_router
  from omnisage.serving.twotower.bundle import TwoTowerBundle
  from omnisage.serving.twotower.service import create_recommend_app
  # Auth sits in front of the routes, so a bundle that never runs (no warm-up) is enough.
  bundle = TwoTowerBundle(path="", manifest={"dims": {"embed_dim": 4, "history_len": 2},
                                             "step": 1}, params={}, functions={}, catalogue=None)
  index = {"items": types.SimpleNamespace(dim=4, size=0)}
  # A real service with no users: the routes reach it and answer "unknown user".
  router = pinnersage_router(PinnerSageService(
      Items.create(["i0", "i1"], np.eye(2, 4, dtype=np.float32)), index=None))
  app = create_recommend_app(bundle, index, extra_routers=(router,), auth_token=TOKEN,
                             warmup=False)
  with serving(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
    right = {"Authorization": BEARER}
    user = {"user_id": "nobody", "k": 5}
    for headers in ({}, {"Authorization": "Bearer nope"}):
      for path, body in (("/v1/recommend", {"history": []}), ("/v1/pinnersage/recommend", user),
                         ("/v1/pinnersage/update", {"user_id": "u", "actions": []})):
        r = c.post(path, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert error_of(r.content)["code"] == "unauthorized"
    assert c.get("/healthz").status_code == 200
    # With the token the requests reach the routes (a validation error, an unknown user).
    r = c.post("/v1/recommend", json={"history": [], "k": 0}, headers=right)
    assert r.status_code == 422 and error_of(r.content)["field"] == "k"
    r = c.post("/v1/pinnersage/recommend", json=user, headers=right)
    assert r.status_code == 404 and error_of(r.content)["field"] == "user_id"
    assert c.get("/openapi.json", headers=right).status_code == 200


def test_token_file(tmp_path):
  path = tmp_path / "token"
  path.write_text("  abc-123\n")
  assert auth.read_token(str(path)) == "abc-123"
  path.write_text(" \n\t")
  with pytest.raises(ValueError, match=f"{path}.*empty"):
    auth.read_token(str(path))
  with pytest.raises(ValueError, match=str(tmp_path / "missing")):
    auth.read_token(str(tmp_path / "missing"))
  with pytest.raises(ValueError):
    auth.BearerAuth(None, "")


def test_serve_config_fields_and_legacy_flag():
  from configs import serve
  config = serve.get_config()
  assert config.auth_token_file is None
  assert Limits.from_config(config) == Limits()   # the config's defaults are limits.py's
  config.read_timeout_s = 2.5
  assert Limits.from_config(config).read_timeout_s == 2.5
  argv = translate_argv(["launch.py", "serve", "--auth-token-file=/run/token", "--bundle=b"],
                        "configs", {"serve": "serve.py"})
  assert "--config.auth_token_file=/run/token" in argv


def test_launch_serve_with_a_token_file_and_limits(world, tmp_path):
  """`launch.py serve` reads the token file and applies the config's limits."""
  token = tmp_path / "token"
  token.write_text(TOKEN + "\n", encoding="utf-8")
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, "launch.py", "serve", f"--bundle={world['bundle_dir']}",
       f"--index={world['index_dir']}", f"--port={port}", f"--auth-token-file={token}",
       "--config.read_timeout_s=1", "--config.max_headers=30"],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
      assert process.poll() is None, process.communicate()[1][-3000:]
      with contextlib.suppress(httpx.TransportError):
        if httpx.get(url + "/healthz").status_code == 200:
          break
      assert time.time() < deadline, "launch.py serve did not come up"
      time.sleep(0.2)
    assert httpx.post(url + "/v1/search", json={"query": "cake"}).status_code == 401
    assert httpx.post(url + "/v1/search", json={"query": "cake"}, timeout=60,
                      headers={"Authorization": BEARER}).status_code == 200
    assert one_request(port, request_bytes(headers=[f"X{i}: v" for i in range(30)]))[0] == 431
    with connect(port) as sock:
      sock.sendall(b"GET /healthz HTTP/1.1\r\n")
      t0 = time.perf_counter()
      read_until_closed(sock, limit_s=10)
      assert time.perf_counter() - t0 < 2.5
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr[-3000:]
  assert "not a loopback address" not in stderr


def test_launch_serve_refuses_an_empty_token_file(world, tmp_path):
  token = tmp_path / "empty-token"
  token.write_text("\n")
  result = subprocess.run(
      [sys.executable, "launch.py", "serve", f"--bundle={world['bundle_dir']}",
       f"--index={world['index_dir']}", f"--port={free_port()}", f"--auth-token-file={token}"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and str(token) in result.stderr and "empty" in result.stderr
  assert "Traceback" not in result.stderr


# --- exposure warning ----------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_no_warning_on_loopback(host, caplog):
  with caplog.at_level(logging.WARNING, logger="omnisage"):
    assert runner.exposure_warning(host, authenticated=False) is None
  assert not caplog.records


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_warning_on_other_addresses(host, caplog):
  logger = logging.getLogger("omnisage")
  with caplog.at_level(logging.WARNING, logger="omnisage"), \
      _propagating(logger):
    warning = runner.exposure_warning(host, authenticated=False)
  assert warning and host in warning and "auth_token_file" in warning
  assert [r.getMessage() for r in caplog.records if r.name == "omnisage"] == [warning]
  assert "without authentication" not in runner.exposure_warning(host, authenticated=True)


def test_startup_banner_warns_when_binding_all_interfaces(monkeypatch, caplog):
  """run_until_signal on 0.0.0.0 (a free port, bound for a moment; uvicorn's run is stubbed)."""
  import uvicorn
  monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
  with caplog.at_level(logging.INFO, logger="omnisage"), \
      _propagating(logging.getLogger("omnisage")):
    url, stopped = runner.run_until_signal(object(), "0.0.0.0", 0, "serving {url}")
  messages = [r.getMessage() for r in caplog.records if r.name == "omnisage"]
  banner = [m for m in messages if m.startswith("serving ")]
  assert url.startswith("http://0.0.0.0:") and stopped is None
  assert len(banner) == 1 and "not a loopback address" in banner[0], messages
  assert any(r.levelno == logging.WARNING for r in caplog.records if r.name == "omnisage")


@contextlib.contextmanager
def _propagating(logger):
  """launch.py turns propagation off for "omnisage"; caplog listens on the root logger."""
  previous = logger.propagate
  logger.propagate = True
  try:
    yield
  finally:
    logger.propagate = previous


# --- invisible queries ---------------------------------------------------------------------------

INVISIBLE = ["\x00", "\x00\x00\x00", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \x00\t\u200b ",
             "\x1b\x7f", "\u00ad"]


@pytest.mark.parametrize("text", INVISIBLE, ids=[ascii(t) for t in INVISIBLE])
def test_queries_of_only_invisible_characters_get_422(server, text):
  with httpx.Client(base_url=f"http://127.0.0.1:{server}", timeout=60) as c:
    r = c.post("/v1/search", json={"query": text})
    assert r.status_code == 422, r.text
    assert error_of(r.content)["field"] == "query"
    r = c.post("/v1/embed", json={"queries": ["cake", text]})
    assert r.status_code == 422, r.text
    assert error_of(r.content)["field"] == "queries[1]"
    # Beside visible characters they are fine (the tokenizer reads them as spaces).
    assert c.post("/v1/embed", json={"queries": [text + "cake" + text]}).status_code == 200

