"""The query service (omnisage/serving/omnisearchsage/service.py) over real HTTP on loopback:
results against the bundle and exact search, caching, micro-batching, overload, validation, metrics,
launch.py serve.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omnisage.data.tokenizer import WordPieceTokenizer
from omnisage.serving.bundle.loader import load_bundle
from omnisage.serving.index.scann_index import load_index, read_embeddings
from omnisage.serving.omnisearchsage.service import create_app
from omnisage.serving.service.batcher import bucket_sizes
from omnisage.serving.service.cache import TTLCache
from tests.helpers import (
  ROOT,
  build_tiny_index,
  free_port,
  last_json,
  run_launch,
  running,
  subprocess_env,
)

JSON = {"content-type": "application/json"}


class Clock:
  """An injectable clock: tests move time instead of sleeping."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory):
  """Loaded once per module: bundle, tokenizer, indexes (shared by every app below)."""
  bundle_dir, embeddings, index_dir = build_tiny_index(tiny_bundle, tmp_path_factory.mktemp("idx"))
  bundle = load_bundle(bundle_dir)
  return dict(bundle_dir=bundle_dir, embeddings=embeddings, index_dir=index_dir, bundle=bundle,
              tokenizer=WordPieceTokenizer.from_bundle(bundle), indexes=load_index(index_dir))


def make_app(world, **options):
  options = {"max_batch": 8, **options}
  return create_app(world["bundle"], world["indexes"], tokenizer=world["tokenizer"], **options)


@pytest.fixture(scope="module")
def server(world):
  app = make_app(world)
  with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
    yield app, client


def reference_embeddings(world, texts) -> np.ndarray:
  bundle = world["bundle"]
  ids = world["tokenizer"].encode_batch(texts, bundle.dims["query_len"])
  return bundle.embed_queries(ids)


def metric(client, name, **labels) -> float:
  text = client.get("/metrics").text
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
        return sample.value
  return 0.0


def sample_queries(world, n, offset=0) -> list[str]:
  """n real query texts with distinct token ids (so none share a cache entry)."""
  texts, seen = [], set()
  for text in world["indexes"]["queries"].ids[offset:]:
    key = world["tokenizer"].encode_batch([text], world["bundle"].dims["query_len"]).tobytes()
    if key not in seen:
      seen.add(key)
      texts.append(text)
    if len(texts) == n:
      return texts
  raise AssertionError(f"fewer than {n} distinct queries")


# --- results -------------------------------------------------------------------------------------

def test_embed_equals_bundle(world, server):
  _, client = server
  texts = ["red velvet cake", "Red  Velvet cake", "garden ideas"] + sample_queries(world, 3)
  response = client.post("/v1/embed", json={"queries": texts})
  assert response.status_code == 200, response.text
  body = response.json()
  assert body["dim"] == world["bundle"].dims["embed_dim"]
  got = np.array(body["embeddings"], np.float32)
  np.testing.assert_allclose(got, reference_embeddings(world, texts), atol=1e-5)
  assert body["cached"] == [False] * 6
  # Same token ids (the tiny vocabulary lower-cases; whitespace only separates): one computation,
  # one cache entry.
  assert world["bundle"].manifest["tokenizer"]["lower_case"]
  assert body["embeddings"][0] == body["embeddings"][1]
  again = client.post("/v1/embed", json={"queries": ["RED VELVET   cake"]}).json()
  assert again["cached"] == [True] and again["embeddings"][0] == body["embeddings"][0]


def test_search_matches_exact_search(world, server):
  _, client = server
  text = sample_queries(world, 1, offset=5)[0]
  response = client.post("/v1/search", json={"query": text, "k": 5})
  assert response.status_code == 200, response.text
  body = response.json()
  assert body["query"] == text and set(body["results"]) == {"pins", "products", "queries"}
  q = reference_embeddings(world, [text])[0]
  for kind, hits in body["results"].items():
    data = read_embeddings(os.path.join(world["embeddings"], kind))
    exact = data.vectors @ q
    order = np.argsort(-exact, kind="stable")[:5]
    by_id = {item_id: exact[i] for i, item_id in enumerate(data.ids)}
    ids = [hit["id"] for hit in hits]
    scores = np.array([hit["score"] for hit in hits])
    assert len(hits) == 5
    assert np.all(np.diff(scores) <= 1e-6), f"{kind}: scores not descending"
    np.testing.assert_allclose(scores, [by_id[i] for i in ids], atol=1e-4)   # true inner products
    assert abs(scores[0] - exact[order[0]]) < 1e-5, f"{kind}: top-1 is not the exact top-1"
    recall = len(set(ids) & {data.ids[i] for i in order}) / 5
    assert recall >= 0.8, f"{kind}: recall@5 {recall} against exact search"
    titles = dict(zip(data.ids, data.titles))
    assert [hit["title"] for hit in hits] == [titles[i] for i in ids]


def test_search_types_and_k(server):
  _, client = server
  body = client.post("/v1/search", json={"query": "cake", "k": 3,
                                         "types": ["products", "products"]}).json()
  assert list(body["results"]) == ["products"] and len(body["results"]["products"]) == 3


# --- cache ---------------------------------------------------------------------------------------

def test_cache_hits_are_counted(world, server):
  _, client = server
  (text,) = sample_queries(world, 1, offset=300)
  hits = metric(client, "omnisage_cache_hits_total", cache="embedding")
  misses = metric(client, "omnisage_cache_misses_total", cache="embedding")
  first = client.post("/v1/embed", json={"queries": [text]}).json()
  second = client.post("/v1/embed", json={"queries": [text]}).json()
  assert (first["cached"], second["cached"]) == ([False], [True])
  assert first["embeddings"] == second["embeddings"]
  assert metric(client, "omnisage_cache_hits_total", cache="embedding") == hits + 1
  assert metric(client, "omnisage_cache_misses_total", cache="embedding") == misses + 1
  # /v1/search reuses the cached embedding, then caches the whole result.
  one = client.post("/v1/search", json={"query": text}).json()
  two = client.post("/v1/search", json={"query": text}).json()
  assert one["cached"] and two["cached"] and one["results"] == two["results"]
  assert metric(client, "omnisage_cache_hits_total", cache="search") >= 1
  assert 0 < metric(client, "omnisage_cache_hit_rate", cache="embedding") < 1


def test_cache_ttl_expiry_with_injected_clock(world):
  clock = Clock()
  app = make_app(world, clock=clock, cache_ttl_s=100.0)
  with running(app) as url, httpx.Client(base_url=url) as client:
    def cached():
      return client.post("/v1/embed", json={"queries": ["ttl test"]}).json()["cached"][0]
    assert not cached()
    clock.now += 99
    assert cached()
    clock.now += 101   # 101 s after the last write (a hit does not extend the TTL)
    assert not cached()
    assert metric(client, "omnisage_cache_expirations_total", cache="embedding") == 1


def test_ttl_cache_lru_eviction():
  clock = Clock()
  cache = TTLCache(max_size=2, ttl_s=10, clock=clock)
  cache.put("a", 1)
  cache.put("b", 2)
  assert cache.get("a") == 1      # a is now the most recently used
  cache.put("c", 3)               # evicts b
  assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
  assert (cache.evictions, cache.hits, cache.misses) == (1, 3, 1)
  clock.now += 10
  assert cache.get("a") is None and cache.expirations == 1


# --- micro-batching and overload -----------------------------------------------------------------

def test_bucket_sizes():
  assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
  assert bucket_sizes(1) == [1] and bucket_sizes(12) == [1, 2, 4, 8, 12]


class Gate:
  """before_batch hook: records batch sizes; the first batch waits until release()."""

  def __init__(self):
    self.sizes = []
    self.event = threading.Event()

  def __call__(self, rows):
    self.sizes.append(len(rows))
    if len(self.sizes) == 1:
      self.event.wait(30)

  def wait_blocked(self):
    wait_until(lambda: self.sizes)


def wait_until(condition, timeout=20):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.005)


def test_concurrent_requests_share_tower_calls(world):
  gate = Gate()
  app = make_app(world, before_batch=gate, max_batch=8, max_wait_ms=2)
  texts = sample_queries(world, 13, offset=100)
  with running(app) as url, ThreadPoolExecutor(16) as pool:
    def embed(text):
      with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/v1/embed", json={"queries": [text]}).json()
    first = pool.submit(embed, texts[0])
    gate.wait_blocked()                         # batch 1 = [texts[0]], held in the encoder
    rest = [pool.submit(embed, t) for t in texts[1:]]
    wait_until(lambda: app.state.service.batcher.depth == 13)   # all 12 queued behind it
    gate.event.set()
    bodies = [first.result()] + [f.result() for f in rest]
    with httpx.Client(base_url=url) as client:
      count = metric(client, "omnisage_batch_size_count")
      total = metric(client, "omnisage_batch_size_sum")
  # 13 concurrent single-query requests, 3 tower calls: 1, then 8 (max_batch), then 4.
  assert gate.sizes == [1, 8, 4], gate.sizes
  assert (count, total) == (3, 13)
  got = np.array([b["embeddings"][0] for b in bodies], np.float32)
  one_at_a_time = np.concatenate([reference_embeddings(world, [t]) for t in texts])
  np.testing.assert_allclose(got, one_at_a_time, atol=1e-5)


def test_overload_answers_503_then_recovers(world):
  gate = Gate()
  app = make_app(world, before_batch=gate, max_batch=4, max_queue=4, retry_after_s=2)
  *busy, extra = sample_queries(world, 5, offset=200)
  with running(app) as url, ThreadPoolExecutor(4) as pool, \
      httpx.Client(base_url=url, timeout=30) as client:
    held = pool.submit(client.post, "/v1/embed", json={"queries": busy})
    gate.wait_blocked()                         # 4 queries in the encoder: the queue is full
    t0 = time.perf_counter()
    rejected = client.post("/v1/embed", json={"queries": [extra]})
    assert time.perf_counter() - t0 < 1.0       # at once, not after the encoder finishes
    assert rejected.status_code == 503 and rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["code"] == "overloaded"
    assert client.post("/v1/search", json={"query": extra}).status_code == 503
    # Queries already in flight are shared, not queued again: no 503 for them.
    joined = pool.submit(client.post, "/v1/embed", json={"queries": [busy[1]]})
    time.sleep(0.05)
    gate.event.set()
    assert held.result().status_code == 200 and joined.result().status_code == 200
    assert joined.result().json()["embeddings"][0] == held.result().json()["embeddings"][1]
    recovered = client.post("/v1/embed", json={"queries": [extra]})
    assert recovered.status_code == 200
    assert metric(client, "omnisage_overload_rejections_total") == 2
    assert metric(client, "omnisage_requests_total", endpoint="/v1/embed", status="503") == 1


# --- validation ----------------------------------------------------------------------------------

def raw(obj) -> bytes:
  return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


INVALID = [
    # (path, body, status, code, field)
    ("/v1/search", b'{"query": "a"', 400, "malformed_json", None),
    ("/v1/search", b"\xff\xfe\x00", 400, "malformed_json", None),
    ("/v1/search", {"query": 5}, 422, "invalid_request", "query"),
    ("/v1/search", {"query": ""}, 422, "invalid_request", "query"),
    ("/v1/search", {"query": " \t "}, 422, "invalid_request", "query"),
    ("/v1/search", {"query": "x" * 257}, 413, "payload_too_large", "query"),
    ("/v1/search", {"query": "a", "k": 0}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": 101}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": "5"}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": 2.5}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": True}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": 10 ** 40}, 422, "invalid_request", "k"),
    ("/v1/search", b'{"query": "a", "k": 1e999}', 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "k": None}, 422, "invalid_request", "k"),
    ("/v1/search", {"query": "a", "types": ["boards"]}, 422, "invalid_request", "types[0]"),
    ("/v1/search", {"query": "a", "types": []}, 422, "invalid_request", "types"),
    ("/v1/search", {"query": "a", "types": "pins"}, 422, "invalid_request", "types"),
    ("/v1/search", {"query": "a", "kk": 3}, 422, "invalid_request", "kk"),
    ("/v1/search", {}, 422, "invalid_request", "query"),
    ("/v1/search", b'"\\ud800"', 422, "invalid_request", None),
    ("/v1/search", b'{"query": "\\ud800"}', 422, "invalid_request", "query"),
    ("/v1/search", b"null", 422, "invalid_request", None),
    ("/v1/search", b"[1, 2]", 422, "invalid_request", None),
    ("/v1/embed", {"queries": []}, 422, "invalid_request", "queries"),
    ("/v1/embed", {"queries": "abc"}, 422, "invalid_request", "queries"),
    ("/v1/embed", {"queries": ["a", 3]}, 422, "invalid_request", "queries[1]"),
    ("/v1/embed", {"queries": ["a", ""]}, 422, "invalid_request", "queries[1]"),
    ("/v1/embed", {"queries": ["a", "x" * 300]}, 413, "payload_too_large", "queries[1]"),
    ("/v1/embed", {"queries": ["a"] * 65}, 413, "payload_too_large", "queries"),
    ("/v1/embed", b'{"queries": ["' + b"a" * 2_000_000 + b'"]}', 413, "payload_too_large", None),
]


@pytest.mark.parametrize("path,body,status,code,field", INVALID,
                         ids=[f"{i}-{case[2]}-{case[4]}" for i, case in enumerate(INVALID)])
def test_invalid_requests_get_our_error_shape(server, path, body, status, code, field):
  _, client = server
  response = client.post(path, content=raw(body), headers=JSON)
  assert response.status_code == status, response.text
  assert response.json() == {"error": {"code": code, "message": response.json()["error"]["message"],
                                       "field": field}}
  if field is not None:
    assert response.json()["error"]["message"].startswith(field)


def test_wrong_content_type_method_and_path(server):
  _, client = server
  response = client.post("/v1/search", content=b'{"query": "a"}',
                         headers={"content-type": "text/plain"})
  assert response.status_code == 415
  assert response.json()["error"]["code"] == "unsupported_media_type"
  assert client.post("/v1/search", data={"query": "a"}).status_code == 415   # a form post
  assert client.get("/v1/search").json()["error"]["code"] == "method_not_allowed"
  assert client.get("/nope").json()["error"]["code"] == "not_found"


def random_json(rng, depth=0):
  choice = rng.randrange(9 if depth < 4 else 6)
  if choice == 0:
    return None
  if choice == 1:
    return rng.choice([0, -1, 1, 100, 2 ** 63, -(10 ** 30), 3.5, True, False])
  if choice == 2:
    return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 12)))
  if choice == 3:
    return rng.choice(["pins", "products", "queries", "", " ", "\x00", "\U0001F600" * 3])
  if choice == 4:
    return rng.choice(["red velvet cake", "k", "types", "queries"])
  if choice == 5:
    return rng.randrange(-5, 120)
  if choice == 6:
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
  keys = ["query", "queries", "k", "types", "x"]
  return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def test_fuzzed_input_never_causes_a_server_error(server):
  _, client = server
  rng = random.Random(0)
  bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))) for _ in range(60)]
  bodies += [raw(random_json(rng)) for _ in range(200)]
  bodies += [raw({"query": random_json(rng), "k": random_json(rng), "types": random_json(rng)})
             for _ in range(150)]
  bodies += [raw({"queries": [random_json(rng) for _ in range(3)]}) for _ in range(100)]
  bodies += [b"[" * 50_000, b'{"a":' * 20_000, b'{"query": "a", "k": 1' + b"0" * 5000 + b"}",
             b'{"query": "a", "k": NaN}', b'{"query": "a", "k": -Infinity}', b"",
             b'{"query": "a", "query": 7}', b'\xef\xbb\xbf{"query": "a"}']
  statuses = set()
  for i, body in enumerate(bodies):
    path = "/v1/embed" if i % 2 else "/v1/search"
    response = client.post(path, content=body, headers=JSON)
    statuses.add(response.status_code)
    assert response.status_code < 500, (body[:200], response.text)
    if response.status_code != 200:
      error = response.json()["error"]
      assert set(error) == {"code", "message", "field"} and error["message"]
  assert {200, 400, 422} <= statuses


# --- health, metrics, openapi, page --------------------------------------------------------------

def test_healthz_metrics_openapi_and_page(world, server):
  _, client = server
  health = client.get("/healthz").json()
  assert health["status"] == "ok"
  assert health["index_sizes"] == {k: v.size for k, v in world["indexes"].items()}
  client.post("/v1/search", json={"query": "metrics please"})
  families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
  for name in ("omnisage_requests", "omnisage_request_latency_seconds", "omnisage_batch_size",
               "omnisage_queue_depth", "omnisage_cache_hits", "omnisage_cache_misses",
               "omnisage_cache_hit_rate", "omnisage_index_size",
               "omnisage_encoder_latency_seconds"):
    assert name in families, name
  sizes = {s.labels["type"]: s.value for s in families["omnisage_index_size"].samples}
  assert sizes == {k: v.size for k, v in world["indexes"].items()}
  assert metric(client, "omnisage_requests_total", endpoint="/v1/search", status="200") >= 1
  assert metric(client, "omnisage_request_latency_seconds_count", endpoint="/v1/search") >= 1
  paths = client.get("/openapi.json").json()["paths"]
  assert {"/v1/embed", "/v1/search", "/healthz", "/metrics", "/"} <= set(paths)
  page = client.get("/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  for element in ('id="q"', 'id="go"', 'id="results-pins"', 'id="results-products"',
                  'id="results-queries"'):
    assert element in page.text
  assert "http://" not in page.text and "https://" not in page.text   # self-contained


def test_mismatched_index_dim_is_refused(world):
  class Narrow:
    dim, size = 8, 1
  with pytest.raises(ValueError, match="embed_dim"):
    create_app(world["bundle"], {"pins": Narrow()}, tokenizer=world["tokenizer"])


# --- launch.py serve -----------------------------------------------------------------------------

def test_launch_serve_prints_summary_on_sigterm(world):
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, "launch.py", "serve", f"--bundle={world['bundle_dir']}",
       f"--index={world['index_dir']}", f"--port={port}"],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
      assert process.poll() is None, process.communicate()[1][-3000:]
      try:
        if httpx.get(url + "/healthz").status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.time() < deadline, "launch.py serve did not come up"
      time.sleep(0.2)
    for _ in range(2):
      assert httpx.post(url + "/v1/search", json={"query": "cake"}).status_code == 200
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr[-3000:]
  summary = json.loads(stdout.strip().splitlines()[-1])["serve"]
  assert summary["stopped_by"] == "SIGTERM"
  assert summary["requests"] >= 3 and summary["cache_hit_rate"] > 0
  assert f"127.0.0.1:{port}" in stderr   # the URL is logged


def test_launch_serve_refuses_a_damaged_bundle(world, tmp_path):
  bundle = str(tmp_path / "bundle")
  shutil.copytree(world["bundle_dir"], bundle)
  with open(os.path.join(bundle, "params.safetensors"), "r+b") as f:
    f.seek(-8, os.SEEK_END)
    f.write(b"\x00" * 8)
  result = run_launch("serve", f"--bundle={bundle}", f"--index={world['index_dir']}",
                      f"--port={free_port()}")
  assert result.returncode == 2
  assert "error:" in result.stderr and "sha256" in result.stderr
  assert "Traceback" not in result.stderr
  assert "error" in last_json(result)["serve"]
