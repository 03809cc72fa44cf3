"""The query service's shared machinery: HTTP contract (api.py), micro-batching (batcher.py),
LRU+TTL cache (cache.py), Prometheus metrics (metrics.py), the uvicorn runner (runner.py) with its
connection limits (limits.py), bearer-token authentication (auth.py), the search page (static/)."""
