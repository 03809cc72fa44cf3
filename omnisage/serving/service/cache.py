"""The query-embedding cache in front of the model: LRU with a TTL (SPEC §1 "Serving").

Production serves 300k query requests/s with only ~500/s reaching the model: query frequency is
Zipfian, so a cache with a 30-day TTL absorbs nearly all of them. This is that cache, in process:
an OrderedDict in least-recently-used order, each entry stamped with its expiry time. A hit moves
the entry to the back; an insert past `max_size` evicts from the front; an expired entry is
dropped when it is next looked up (and counted as an expiration and a miss).

Not thread-safe: the server touches it from the event loop only. The clock is injectable so tests
can expire entries without sleeping.

Usage:
  cache = TTLCache(max_size=100_000, ttl_s=30 * 86400)
  vector = cache.get(key)          # None on a miss
  cache.put(key, vector)
"""

import collections
import time
from typing import Any, Callable, Hashable

DAY_S = 86400.0


class TTLCache:

  def __init__(self, max_size: int, ttl_s: float = 30 * DAY_S,
               clock: Callable[[], float] = time.monotonic):
    if max_size < 0:
      raise ValueError(f"cache max_size must be >= 0, got {max_size}")
    if ttl_s <= 0:
      raise ValueError(f"cache ttl_s must be > 0, got {ttl_s}")
    self.max_size = max_size
    self.ttl_s = ttl_s
    self.clock = clock
    self._entries: collections.OrderedDict[Hashable, tuple[float, Any]] = (
        collections.OrderedDict())
    self.hits = self.misses = self.evictions = self.expirations = 0

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, key: Hashable):
    entry = self._entries.get(key)
    if entry is not None:
      expires, value = entry
      if self.clock() < expires:
        self._entries.move_to_end(key)
        self.hits += 1
        return value
      del self._entries[key]
      self.expirations += 1
    self.misses += 1
    return None

  def put(self, key: Hashable, value) -> None:
    if self.max_size == 0:   # a disabled cache
      return
    self._entries[key] = (self.clock() + self.ttl_s, value)
    self._entries.move_to_end(key)
    while len(self._entries) > self.max_size:
      self._entries.popitem(last=False)
      self.evictions += 1

  def hit_rate(self) -> float:
    lookups = self.hits + self.misses
    return self.hits / lookups if lookups else 0.0

  def stats(self) -> dict:
    return {"entries": len(self), "hits": self.hits, "misses": self.misses,
            "evictions": self.evictions, "expirations": self.expirations,
            "hit_rate": round(self.hit_rate(), 4)}
