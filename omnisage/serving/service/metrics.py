"""Prometheus metrics of the query service (SPEC §1 "Serving"): what /metrics exports.

Each app gets its own CollectorRegistry (never prometheus_client's global one), so a process can
hold several apps (the tests do) without duplicate-metric errors. Figures that mirror live state
(queue depth, cache tallies) are read at scrape time, so they cannot drift from it.

Usage:
  metrics = Metrics(max_batch=64)
  metrics.observe_request("/v1/search", 200, seconds)
  body = metrics.render()          # Prometheus text format
"""

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Request latency buckets: the SPEC's targets (p50 3 ms, p90 20 ms) fall between buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)
# Paths reported under their own label; anything else is "other" (label sets stay bounded
# whatever paths clients try).
ENDPOINTS = ("/", "/v1/embed", "/v1/search", "/healthz", "/metrics", "/openapi.json", "/docs")


class Metrics:

  def __init__(self, max_batch: int):
    self.registry = prom.CollectorRegistry(auto_describe=True)
    r = self.registry
    self.requests = prom.Counter("omnisage_requests", "HTTP requests by endpoint and status",
                                 ["endpoint", "status"], registry=r)
    self.latency = prom.Histogram("omnisage_request_latency_seconds",
                                  "HTTP request latency by endpoint", ["endpoint"],
                                  buckets=LATENCY_BUCKETS, registry=r)
    sizes = [1 << i for i in range(max_batch.bit_length() + 1)]
    self.batch_size = prom.Histogram("omnisage_batch_size", "Queries per query-tower call "
                                     "(before padding to a bucket)", buckets=sizes, registry=r)
    self.padded_batch = prom.Histogram("omnisage_padded_batch_size", "Rows per query-tower "
                                       "call after padding to a bucket", buckets=sizes, registry=r)
    self.encoder_latency = prom.Histogram("omnisage_encoder_latency_seconds", "Seconds per "
                                          "query-tower call", buckets=LATENCY_BUCKETS, registry=r)
    self.queries = prom.Counter("omnisage_queries", "Queries received, by endpoint",
                                ["endpoint"], registry=r)
    self.rejected = prom.Counter("omnisage_overload_rejections", "Requests answered 503 because "
                                 "the queue was full", registry=r)
    self.queue_depth = prom.Gauge("omnisage_queue_depth", "Queries waiting for or inside the "
                                  "query tower", registry=r)
    self.caches = {}   # name -> TTLCache, read at scrape time by _CacheCollector
    r.register(_CacheCollector(self.caches))
    self.index_size = prom.Gauge("omnisage_index_size", "Items in the ANN index, by entity "
                                 "type", ["type"], registry=r)

  def observe_request(self, path: str, status: int, seconds: float) -> None:
    endpoint = path if path in ENDPOINTS else "other"
    self.requests.labels(endpoint, str(status)).inc()
    self.latency.labels(endpoint).observe(seconds)

  def observe_batch(self, rows: int, padded: int, seconds: float) -> None:
    self.batch_size.observe(rows)
    self.padded_batch.observe(padded)
    self.encoder_latency.observe(seconds)

  def watch_cache(self, name: str, cache) -> None:
    """Exports `cache`'s tallies (a TTLCache) under cache=name."""
    self.caches[name] = cache

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)


class _CacheCollector(Collector):
  """Cache hits/misses/evictions/expirations, hit rate and size, read from the caches themselves
  at every scrape (the cache keeps its own tallies; no second copy to keep in step)."""

  def __init__(self, caches: dict):
    self.caches = caches

  def collect(self):
    for event in ("hits", "misses", "evictions", "expirations"):
      family = CounterMetricFamily(f"omnisage_cache_{event}", f"Cache {event}, by cache",
                                   labels=["cache"])
      for name, cache in self.caches.items():
        family.add_metric([name], getattr(cache, event))
      yield family
    rate = GaugeMetricFamily("omnisage_cache_hit_rate", "hits / (hits + misses) since start, by "
                             "cache", labels=["cache"])
    entries = GaugeMetricFamily("omnisage_cache_entries", "Entries held, by cache",
                                labels=["cache"])
    for name, cache in self.caches.items():
      rate.add_metric([name], cache.hit_rate())
      entries.add_metric([name], len(cache))
    yield rate
    yield entries
