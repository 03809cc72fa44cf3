"""Micro-batching of concurrent queries into one tower call (SPEC §1 "Serving").

A model server earns its throughput by running many queries per accelerator call. Requests hand
their (uncached) token rows to one MicroBatcher; its single worker task waits until `max_batch`
rows are pending or `max_wait_ms` have passed since the oldest one arrived, then runs them through
`run_batch` in ONE call on a dedicated thread (the event loop keeps accepting requests meanwhile)
and resolves each row's future.

- Few compiled shapes: a batch is padded (by repeating its first row) to the next bucket, a power
  of two up to max_batch, so the jitted tower sees at most log2(max_batch) + 1 shapes, all of which
  `warmup` compiles before the first request.
- Identical rows in flight share one future (a popular query arriving twice before the first
  finishes costs one row, not two).
- Bounded: `submit` raises Overloaded instead of queueing more than `max_queue` rows (pending plus
  running), so an overloaded server answers 503 at once rather than letting latency grow without
  bound.

Usage (inside a running event loop):
  batcher = MicroBatcher(bundle.embed_queries, max_batch=64, max_wait_ms=2, max_queue=256)
  batcher.warmup(example_row); batcher.start()
  vectors = await batcher.embed([(key, row), ...])     # list of [D] float32 arrays
  await batcher.stop()
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable, Hashable

import numpy as np


class Overloaded(Exception):
  """More rows would be queued than max_queue allows."""


@dataclasses.dataclass
class _Item:
  key: Hashable
  row: np.ndarray
  future: asyncio.Future
  arrived: float   # loop.time() at submission


def bucket_sizes(max_batch: int) -> list[int]:
  """1, 2, 4, ... up to max_batch (max_batch itself last, even when not a power of two)."""
  sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
  return sizes + [max_batch]


class MicroBatcher:

  def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
               max_wait_ms: float = 2.0, max_queue: int = 256,
               on_batch: Callable[[int, int, float], None] | None = None,
               before_batch: Callable[[np.ndarray], None] | None = None):
    """run_batch: rows [B, ...] -> [B, D], thread-safe for one caller at a time.

    on_batch(rows, padded_rows, seconds) is called on the event loop after every batch (metrics);
    before_batch(rows) runs on the encoder thread before every batch (tests use it to slow or
    pause the encoder).
    """
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
      raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got "
                       f"{max_batch}, {max_queue}, {max_wait_ms}")
    self.run_batch = run_batch
    self.max_batch = max_batch
    self.max_wait_s = max_wait_ms / 1000
    self.max_queue = max_queue
    self.buckets = bucket_sizes(max_batch)
    self.on_batch = on_batch
    self.before_batch = before_batch
    self._pending: collections.deque[_Item] = collections.deque()
    self._inflight: dict[Hashable, asyncio.Future] = {}   # pending or running, by key
    self._executor = None
    self._worker = None
    self.batches = 0
    self.rows = 0

  @property
  def depth(self) -> int:
    """Rows queued or running."""
    return len(self._inflight)

  def warmup(self, example_row: np.ndarray) -> list[float]:
    """Compiles every bucket shape (call before start); returns seconds per bucket."""
    seconds = []
    for size in self.buckets:
      t0 = time.perf_counter()
      self._padded_run(np.stack([example_row] * size))
      seconds.append(time.perf_counter() - t0)
    return seconds

  def start(self) -> None:
    # One thread: the tower runs one batch at a time, and JAX calls stay off the event loop.
    self._executor = concurrent.futures.ThreadPoolExecutor(1, "omnisage-encoder")
    self._arrived = asyncio.Event()
    self._full = asyncio.Event()
    self._worker = asyncio.get_running_loop().create_task(self._work())

  async def stop(self) -> None:
    if self._worker is not None:
      self._worker.cancel()
      try:
        await self._worker
      except asyncio.CancelledError:
        pass
    for future in self._inflight.values():
      if not future.done():
        future.set_exception(RuntimeError("the server is shutting down"))
    self._inflight.clear()
    self._pending.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=False)

  async def embed(self, items: list[tuple[Hashable, np.ndarray]]) -> list[np.ndarray]:
    """Embeds (key, row) pairs; rows with equal keys must be equal. Raises Overloaded."""
    futures = self.submit(items)
    # shield: a client that disconnects must not cancel a future other requests share.
    return list(await asyncio.gather(*(asyncio.shield(f) for f in futures)))

  def submit(self, items: list[tuple[Hashable, np.ndarray]]) -> list[asyncio.Future]:
    new = {key: row for key, row in items if key not in self._inflight}
    if self.depth + len(new) > self.max_queue:
      raise Overloaded(f"{self.depth} queries queued, {len(new)} more would pass the limit of "
                       f"{self.max_queue}")
    loop = asyncio.get_running_loop()
    now = loop.time()
    for key, row in new.items():
      future = loop.create_future()
      self._inflight[key] = future
      self._pending.append(_Item(key, row, future, now))
    if new:
      self._arrived.set()
      if len(self._pending) >= self.max_batch:
        self._full.set()
    return [self._inflight[key] for key, _ in items]

  async def _work(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self._pending:
        self._arrived.clear()
        await self._arrived.wait()
      # Wait for a full batch, but never longer than max_wait after the oldest row arrived (a
      # row that already waited behind the previous batch goes out at once).
      wait = self._pending[0].arrived + self.max_wait_s - loop.time()
      if len(self._pending) < self.max_batch and wait > 0:
        self._full.clear()
        try:
          await asyncio.wait_for(self._full.wait(), wait)
        except TimeoutError:
          pass
      batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
      rows = np.stack([item.row for item in batch])
      t0 = time.perf_counter()
      try:
        vectors = await loop.run_in_executor(self._executor, self._hooked_run, rows)
      except Exception as error:   # every waiting request gets the error, the worker lives on
        for item in batch:
          self._resolve(item, error=error)
      else:
        for item, vector in zip(batch, vectors):
          self._resolve(item, value=vector)
      self.batches += 1
      self.rows += len(batch)
      if self.on_batch is not None:
        self.on_batch(len(batch), self._bucket(len(batch)), time.perf_counter() - t0)

  def _resolve(self, item: _Item, value=None, error=None) -> None:
    self._inflight.pop(item.key, None)
    if item.future.done():
      return
    if error is not None:
      item.future.set_exception(error)
    else:
      item.future.set_result(value)

  def _hooked_run(self, rows: np.ndarray) -> list[np.ndarray]:
    if self.before_batch is not None:
      self.before_batch(rows)
    out = self._padded_run(rows)
    # Copies: a cached vector must not keep its whole batch's output array alive.
    return [out[i].copy() for i in range(len(rows))]

  def _padded_run(self, rows: np.ndarray) -> np.ndarray:
    n = len(rows)
    size = self._bucket(n)
    if size > n:   # repeat a real row: all-padding rows could produce NaNs worth no thought
      rows = np.concatenate([rows, np.repeat(rows[:1], size - n, axis=0)])
    return np.asarray(self.run_batch(rows))[:n]

  def _bucket(self, n: int) -> int:
    return next(size for size in self.buckets if size >= n)
