"""The online query-embedding and search service (SPEC §1 "Serving"): FastAPI + uvicorn.

Production embeds queries online with a model server behind a 30-day-TTL cache (300k requests/s,
~500/s reaching the model) and retrieves pins and products from an ANN index. Here, in one
process:

  request -> validate (api.py) -> tokenize -> cache (cache.py) -> micro-batcher (batcher.py)
          -> bundle.embed_queries (one call per batch, on its own thread) -> cache
  /v1/search then asks each requested type's KindIndex for the top k.

Endpoints: POST /v1/embed, POST /v1/search, GET /healthz, GET /metrics (Prometheus text),
GET /openapi.json, GET / (the search page, static/index.html). Errors: see api.py.

The cache key is the query's token ids (after cropping to the tower's query_len), not its text:
two texts the tokenizer maps to the same ids ("Red  velvet cake", "red velvet cake" with a
lower-casing vocabulary) have the same embedding, so they share one entry, and nothing about the
tokenizer's normalisation has to be duplicated here. A second cache holds whole search results
by (token ids, k, types); the index is loaded once at start, so they cannot go stale before the
process ends.

Everything is loaded, checked and compiled (one query-tower shape per batch bucket) in
create_app, before the port opens: a damaged bundle or index fails there with a clear message.

Usage:
  summary = serve("runs/demo/bundle", "runs/demo/index", port=8080)   # blocks until SIGINT/TERM
  app = create_app(bundle_or_path, index_or_path, max_batch=8, clock=fake_clock)   # tests
"""

import asyncio
import contextlib
import logging
import os
import time

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from omnisage.serving.bundle.loader import Bundle, load_bundle
from omnisage.serving.service import api, auth
from omnisage.serving.service.api import ApiError, EmbedRequest, SearchRequest
from omnisage.serving.service.batcher import MicroBatcher, Overloaded
from omnisage.serving.service.cache import DAY_S, TTLCache
from omnisage.serving.service.limits import Limits
from omnisage.serving.service.metrics import Metrics
from omnisage.serving.service.runner import run_until_signal

log = logging.getLogger("omnisage")

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "service",
                          "static")
DEFAULTS = dict(
    max_batch=64,            # queries per query-tower call (the largest compiled bucket)
    max_wait_ms=2.0,         # how long the oldest queued query waits for a fuller batch
    max_queue=256,           # queries queued or running before requests get 503
    cache_size=100_000,      # query embeddings kept (x 1 KiB each at embed_dim 256)
    search_cache_size=20_000,  # whole search results kept
    cache_ttl_s=30 * DAY_S,  # SPEC: a 30-day TTL
    max_query_chars=256,     # longer query strings -> 413
    max_queries=64,          # more queries in one /v1/embed -> 413
    retry_after_s=1,         # the Retry-After of a 503
    warmup=True,             # compile every batch bucket before serving
)


class QueryService:
  """What the routes call: tokenizer, caches, batcher and indexes (no HTTP in here)."""

  def __init__(self, bundle: Bundle, tokenizer, indexes: dict, metrics: Metrics, options: dict,
               clock, before_batch=None):
    self.bundle, self.tokenizer, self.indexes, self.metrics = bundle, tokenizer, indexes, metrics
    self.options = options
    self.query_len = int(bundle.dims["query_len"])
    self.dim = int(bundle.dims["embed_dim"])
    self.cache = TTLCache(options["cache_size"], options["cache_ttl_s"], clock)
    self.search_cache = TTLCache(options["search_cache_size"], options["cache_ttl_s"], clock)
    self.batcher = MicroBatcher(bundle.embed_queries, options["max_batch"],
                                options["max_wait_ms"], options["max_queue"],
                                on_batch=metrics.observe_batch, before_batch=before_batch)
    metrics.watch_cache("embedding", self.cache)
    metrics.watch_cache("search", self.search_cache)
    metrics.queue_depth.set_function(lambda: self.batcher.depth)
    for kind, index in indexes.items():
      metrics.index_size.labels(kind).set(index.size)
    self.started = time.time()
    self.requests = 0
    self.queries = 0   # query texts received (/v1/embed and /v1/search)

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, list[bytes]]:
    rows = self.tokenizer.encode_batch(texts, self.query_len)
    return rows, [row.tobytes() for row in rows]

  async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], list[bool]]:
    self.queries += len(texts)
    rows, keys = self.tokenize(texts)
    return await self._embed_rows(rows, keys)

  async def _embed_rows(self, rows, keys) -> tuple[list[np.ndarray], list[bool]]:
    vectors = [self.cache.get(key) for key in keys]
    cached = [v is not None for v in vectors]
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
      try:
        fresh = await self.batcher.embed([(keys[i], rows[i]) for i in missing])
      except Overloaded as error:
        self.metrics.rejected.inc()
        retry = str(self.options["retry_after_s"])
        raise ApiError(503, "overloaded", f"server overloaded ({error}); retry in {retry} s",
                       headers={"Retry-After": retry}) from error
      for i, vector in zip(missing, fresh):
        vectors[i] = vector
        self.cache.put(keys[i], vector)
    return vectors, cached

  async def search(self, text: str, k: int, types: list[str],
                   mode: str = "dense") -> tuple[dict, bool]:
    self.queries += 1
    rows, keys = self.tokenize([text])
    # Lexical and hybrid results depend on the words, not only on the token ids.
    result_key = (keys[0], k, tuple(types)) if mode == "dense" else (text, k, tuple(types), mode)
    results = self.search_cache.get(result_key)
    if results is not None:
      return results, True
    vector, cached = None, False
    if mode != "lexical":
      (vector,), (cached,) = await self._embed_rows(rows, keys)
    # ScaNN and BM25 run off the event loop: small indexes answer in well under a millisecond,
    # but a large or brute-force one must not stall every other request meanwhile.
    results = await asyncio.to_thread(self._search_indexes, vector, text, k, types, mode)
    self.search_cache.put(result_key, results)
    return results, cached

  def _search_indexes(self, vector: np.ndarray | None, text: str, k: int, types: list[str],
                      mode: str = "dense") -> dict:
    results = {}
    for kind in types:
      index = self.indexes[kind]
      k_kind = min(k, index.size)
      if mode == "lexical":
        scores, rows = index.lexical_search([text], k_kind)
      elif mode == "hybrid":
        scores, rows = index.hybrid_search(vector[None, :].astype(np.float32), [text], k_kind)
      else:
        scores, rows = index.search(vector[None, :].astype(np.float32), k_kind)
      results[kind] = [{"id": index.ids[r], "title": index.titles[r],
                        "score": float(s)} for s, r in zip(scores[0], rows[0]) if r >= 0]
    return results

  def summary(self) -> dict:
    """cache_hit_rate: the fraction of received queries that never reached the tower (served by
    either cache, or sharing an identical query's computation): the SPEC's 300k requests/s vs
    ~500/s reaching the model is a hit rate of 0.998."""
    batches, embedded = self.batcher.batches, self.batcher.rows
    return {"requests": self.requests, "queries": self.queries, "queries_embedded": embedded,
            "tower_calls": batches, "mean_batch": round(embedded / batches, 2) if batches else 0.0,
            "cache_hit_rate": round(1 - embedded / self.queries, 4) if self.queries else 0.0,
            "cache": self.cache.stats(), "search_cache": self.search_cache.stats(),
            "uptime_s": round(time.time() - self.started, 1)}


def create_app(bundle_path, index_path, tokenizer=None, clock=time.monotonic, before_batch=None,
               auth_token: str | None = None, **options) -> FastAPI:
  """Loads, checks and warms everything, then returns the app (not yet serving).

  bundle_path / index_path: directories, or an already loaded Bundle / {kind: KindIndex} (tests
  share one across apps). tokenizer: default QueryEncoder.from_bundle(bundle). clock: the
  caches' clock (seconds). before_batch(rows): runs on the encoder thread before each tower
  call (tests slow or pause it). auth_token: required as a bearer token on every route but
  /healthz (auth.py); None: no authentication. Other options: see DEFAULTS.
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown server options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  options = {**DEFAULTS, **options}
  bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
  indexes = _load_indexes(index_path, int(bundle.dims["embed_dim"]))
  if tokenizer is None:
    from omnisage.data.omnisearchsage.query_input import QueryEncoder
    tokenizer = QueryEncoder.from_bundle(bundle)
  metrics = Metrics(options["max_batch"])
  service = QueryService(bundle, tokenizer, indexes, metrics, options, clock, before_batch)
  if options["warmup"]:
    t0 = time.perf_counter()
    service.batcher.warmup(service.tokenize(["warm up"])[0][0])
    log.info("compiled the query tower for batch sizes %s in %.1f s", service.batcher.buckets,
             time.perf_counter() - t0)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    service.batcher.start()
    yield
    await service.batcher.stop()

  app = FastAPI(title="omnisage query service", version="1", lifespan=lifespan,
                description="Query embeddings and multi-entity search (SPEC §1 \"Serving\").")
  app.state.service = service
  app.state.metrics = metrics
  max_text_bytes = 6 * options["max_query_chars"] + 16   # a \uXXXX escape per char, quotes
  api.install(app, max_body_bytes=2 * options["max_queries"] * max_text_bytes + 65536)
  auth.install(app, auth_token)   # outside the body guard: no body is read for a stranger
  app.add_middleware(_RequestMetrics, service=service)   # outermost: 401s are counted too
  _add_routes(app, service, options)
  return app


def _load_indexes(index_path, embed_dim: int) -> dict:
  if isinstance(index_path, dict):
    indexes = index_path
  else:
    from omnisage.serving.index.scann_index import load_index
    indexes = load_index(index_path)
  if not indexes:
    raise ValueError(f"{index_path}: no index to serve (expected pins/, products/, queries/)")
  for kind, index in indexes.items():
    if kind not in api.KINDS:
      raise ValueError(f"index kind {kind!r} is not one of {api.KINDS}")
    if index.dim != embed_dim:
      raise ValueError(f"{index_path}/{kind}: index dim {index.dim} but the bundle's embed_dim "
                       f"is {embed_dim}: index and bundle come from different models")
  return indexes


def _add_routes(app: FastAPI, service: QueryService, options: dict) -> None:
  max_chars, max_queries = options["max_query_chars"], options["max_queries"]
  with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
    page = f.read()

  @app.post("/v1/embed", response_model=api.EmbedResponse, responses=api.ERROR_RESPONSES)
  async def embed(body: EmbedRequest):
    """Embeds up to max_queries query texts with the query tower."""
    if len(body.queries) > max_queries:
      raise ApiError(413, "payload_too_large", f"queries: {len(body.queries)} queries, more than "
                     f"the limit of {max_queries}", "queries")
    for i, text in enumerate(body.queries):
      api.check_text(text, f"queries[{i}]", max_chars)
    service.metrics.queries.labels("/v1/embed").inc(len(body.queries))
    vectors, cached = await service.embed(body.queries)
    return JSONResponse({"embeddings": [v.tolist() for v in vectors], "dim": service.dim,
                         "cached": cached})

  @app.post("/v1/search", response_model=api.SearchResponse, responses=api.ERROR_RESPONSES)
  async def search(body: SearchRequest):
    """Top-k pins, products and queries for one query text."""
    api.check_text(body.query, "query", max_chars)
    types = list(dict.fromkeys(body.types or service.indexes))   # de-duplicated, in order
    for i, kind in enumerate(types):
      if kind not in service.indexes:
        raise ApiError(422, "invalid_request", f"types[{i}]: no {kind!r} index is loaded "
                       f"(loaded: {sorted(service.indexes)})", f"types[{i}]")
      if body.mode != "dense" and service.indexes[kind].lexical is None:
        raise ApiError(422, "invalid_request", f"mode: {body.mode!r} needs a lexical index, and "
                       f"the {kind!r} index has none (rebuild it with launch.py index)", "mode")
    service.metrics.queries.labels("/v1/search").inc()
    results, cached = await service.search(body.query, body.k, types, body.mode)
    return JSONResponse({"query": body.query, "cached": cached, "results": results})

  @app.get("/healthz")
  async def healthz():
    return api.health({
        "bundle_step": lambda: service.bundle.step, "embed_dim": lambda: service.dim,
        "index_sizes": lambda: {k: index.size for k, index in service.indexes.items()},
        "queue_depth": lambda: service.batcher.depth,
        "uptime_s": lambda: round(time.time() - service.started, 1)})

  @app.get("/metrics", response_class=Response)
  async def metrics():
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/", response_class=HTMLResponse)
  async def search_page():
    return HTMLResponse(page)


class _RequestMetrics:
  """ASGI middleware: request count by endpoint and status, and latency (errors included)."""

  def __init__(self, app, service: QueryService):
    self.app = app
    self.service = service

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    status = 500   # if the app raises before answering

    async def send_status(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      self.service.requests += 1
      self.service.metrics.observe_request(scope["path"], status, time.perf_counter() - t0)


def serve_config(config) -> dict:
  """`launch.py serve` of an OmniSearchSage bundle: the options of configs/serve.py."""
  token_file = config.get("auth_token_file")
  return serve(config.bundle, config.index, host=config.host, port=config.port,
               limits=Limits.from_config(config),
               auth_token=auth.read_token(token_file) if token_file else None,
               max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
               max_queue=config.max_queue, cache_size=config.cache_size,
               cache_ttl_s=config.cache_ttl_days * DAY_S)


def serve(bundle_path, index_path, host: str = "127.0.0.1", port: int = 8080,
          limits: Limits | None = None, auth_token: str | None = None, **options) -> dict:
  """Serves until SIGINT/SIGTERM, then returns a summary (requests, cache hit rate, ...).

  One process, one event loop: the compiled query tower is not fork-safe, and micro-batching
  needs all requests in one place anyway. limits: the connection limits (runner.py, limits.py).
  auth_token: the bearer token every route but /healthz requires (auth.py; serve_config reads it
  from config.auth_token_file).
  """
  app = create_app(bundle_path, index_path, auth_token=auth_token, **options)
  url, stopped = run_until_signal(
      app, host, port, "serving {url} (search page), {url}v1/embed, {url}v1/search, {url}metrics",
      limits=limits, authenticated=auth_token is not None)
  return {"url": url, **app.state.service.summary(), "stopped_by": stopped}


