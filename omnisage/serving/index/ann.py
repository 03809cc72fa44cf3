"""Nearest-neighbour search primitives: exact top-k in JAX and tuned ScaNN (SPEC §1 "Serving").

Production retrieves pins and products from an approximate-nearest-neighbour index (HNSW there,
ScaNN here). This module holds what the index builder
(`omnisage.serving.index.scann_index`) and the retrieval
benchmark (`benchmarks.retrieval`) share:

- `ExactSearcher` / `exact_topk`: brute-force inner-product top-k, a jitted matmul + `lax.top_k`
  over fixed-size database chunks (memory stays bounded by chunk x query block, and one compiled
  shape serves every chunk); the ground truth for recall.
- `build_scann`: a ScaNN tree + asymmetric-hashing (AH) + exact-reorder searcher.
- `autotune`: picks (num_leaves, leaves_to_search, reorder) for a target Recall@10 from a grid,
  the fastest config that meets it. Leaves searched and reorder size are query-time overrides, so
  one built tree serves every trial of its row of the grid.

Usage: `scores, rows = exact_topk(queries, database, k=10)`;
`result = autotune(database, tune_queries, holdout_queries, target_recall=0.95)`.
"""

import functools
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("omnisage")

# Asymmetric hashing: 2 dims per 4-bit code block (LUT16) and the anisotropic loss threshold the
# ScaNN paper uses for maximum inner product search.
AH_DIMS_PER_BLOCK = 2
AH_THRESHOLD = 0.2
# Below this many rows a tree is pointless: the index scores every row exactly.
BRUTE_FORCE_BELOW = 2000


def import_scann():
  """`scann.scann_ops_pybind` without TensorFlow.

  `import scann` also imports TensorFlow when it is installed (for its TF ops, which we never
  use), which costs seconds and memory per process. Serving must stay TensorFlow-free, so the
  import is hidden from scann's package init for the duration, unless something already imported
  TensorFlow.
  """
  if "scann" in sys.modules or "tensorflow" in sys.modules:
    import scann
    return scann.scann_ops_pybind
  sys.modules["tensorflow"] = None   # makes `import tensorflow` raise ModuleNotFoundError
  try:
    import scann
  finally:
    del sys.modules["tensorflow"]
  return scann.scann_ops_pybind


# ---------------------------------------------------------------------------------------------
# Exact search


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_topk(queries, chunk, valid, best_scores, best_rows, offset, k):
  """Merges the top-k of `queries @ chunk.T` (first `valid` rows real) into the running best."""
  scores = queries @ chunk.T
  columns = jnp.arange(chunk.shape[0])
  scores = jnp.where(columns[None, :] < valid, scores, -jnp.inf)
  top_scores, top_cols = jax.lax.top_k(scores, k)
  all_scores = jnp.concatenate([best_scores, top_scores], axis=1)
  all_rows = jnp.concatenate([best_rows, top_cols + offset], axis=1)
  merged, order = jax.lax.top_k(all_scores, k)
  return merged, jnp.take_along_axis(all_rows, order, axis=1)


class ExactSearcher:
  """Brute-force inner-product search held on the JAX device in fixed-size database chunks."""

  def __init__(self, database: np.ndarray, chunk_rows: int = 32768, query_block: int = 512):
    database = np.asarray(database, np.float32)
    if database.ndim != 2 or database.shape[0] == 0:
      raise ValueError(f"database must be a non-empty [N, D] matrix, got shape {database.shape}")
    self.size, self.dim = database.shape
    self.chunk_rows = min(chunk_rows, self.size)
    self.query_block = query_block
    self.chunks = []
    for start in range(0, self.size, self.chunk_rows):
      part = database[start:start + self.chunk_rows]
      valid = part.shape[0]
      if valid < self.chunk_rows:   # pad the last chunk so every chunk has one compiled shape
        part = np.concatenate([part, np.zeros((self.chunk_rows - valid, self.dim), np.float32)])
      self.chunks.append((jax.device_put(part), valid, start))

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [B, k], rows int64 [B, k]), best first."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [B, {self.dim}], got shape {queries.shape}")
    if not 1 <= k <= min(self.size, self.chunk_rows):
      raise ValueError(f"k must be in 1..{min(self.size, self.chunk_rows)} (the database size), "
                       f"got {k}")
    scores_out = np.empty((len(queries), k), np.float32)
    rows_out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), self.query_block):
      block = queries[start:start + self.query_block]
      n = len(block)
      # Pad the query block too: one compiled shape for every block.
      block = np.pad(block, ((0, self.query_block - n), (0, 0))) if n < self.query_block else block
      best_s = jnp.full((self.query_block, k), -jnp.inf, jnp.float32)
      best_r = jnp.zeros((self.query_block, k), jnp.int32)
      for chunk, valid, offset in self.chunks:
        best_s, best_r = _chunk_topk(block, chunk, valid, best_s, best_r, offset, k=k)
      scores_out[start:start + n] = np.asarray(best_s)[:n]
      rows_out[start:start + n] = np.asarray(best_r)[:n]
    return scores_out, rows_out


def exact_topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k in JAX: (scores float32 [B, k], rows int64 [B, k]), best first."""
  return ExactSearcher(database).search(queries, k)


def recall_at_k(queries: np.ndarray, database: np.ndarray, rows: np.ndarray,
                exact_scores: np.ndarray) -> float:
  """Mean fraction of the returned top-k that belongs to the exact top-k.

  A returned row counts when its true score reaches the exact k-th score (less float round-off),
  so ties at the boundary (duplicate vectors) are not counted as misses.
  """
  return float(recall_per_query(queries, database, rows, exact_scores).mean())


def recall_per_query(queries: np.ndarray, database: np.ndarray, rows: np.ndarray,
                     exact_scores: np.ndarray) -> np.ndarray:
  """Recall@k of each query (see `recall_at_k`)."""
  k = exact_scores.shape[1]
  rows = rows[:, :k]
  valid = (rows >= 0) & (rows < len(database))
  safe = np.where(valid, rows, 0)
  true = np.einsum("bd,bkd->bk", queries, database[safe])
  kth = exact_scores[:, -1:]
  hits = valid & (true >= kth - 1e-5 * np.maximum(1.0, np.abs(kth)))
  return np.minimum(hits.sum(axis=1), k) / k


def measure_qps(search, queries: np.ndarray, min_seconds: float = 0.5,
                min_repeats: int = 2) -> float:
  """Queries per second of `search(queries)`, after one warm-up call, over >= min_seconds."""
  search(queries)
  done, t0 = 0, time.perf_counter()
  while True:
    search(queries)
    done += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= min_seconds and done >= min_repeats:
      return done * len(queries) / elapsed


# ---------------------------------------------------------------------------------------------
# ScaNN


def build_scann(database: np.ndarray, k: int, num_leaves: int | None, leaves_to_search: int = 1,
                reorder: int = 100, training_sample_size: int | None = None,
                threads: int | None = None):
  """A ScaNN searcher: tree + AH + float reorder, or exact brute force when num_leaves is None.

  leaves_to_search and reorder are only the searcher's defaults: `scann_search` overrides them.
  Unit-norm rows (our embeddings) get spherical k-means: leaves are then ranked by the cosine to
  a normalised centre. With plain k-means a leaf that merges several small topics has a short
  centre and loses to unrelated big leaves on raw dot product (docs/serving.md has the figures).
  """
  pybind = import_scann()
  builder = pybind.builder(database, k, "dot_product")
  if num_leaves is None:
    searcher = builder.score_brute_force().build()
  else:
    n = len(database)
    # k-means wants tens of rows per centre; more than 250k rows buys little at these sizes.
    sample = training_sample_size or min(n, max(100_000, 50 * num_leaves))
    norms = np.linalg.norm(database[::max(1, n // 10_000)], axis=1)
    spherical = bool(np.abs(norms - 1.0).max() < 1e-3)
    searcher = (builder.tree(num_leaves=num_leaves, num_leaves_to_search=leaves_to_search,
                             training_sample_size=min(sample, n), spherical=spherical)
                .score_ah(AH_DIMS_PER_BLOCK, anisotropic_quantization_threshold=AH_THRESHOLD)
                .reorder(reorder).build())
  searcher.set_num_threads(threads or os.cpu_count() or 1)
  return searcher


def scann_search(searcher, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
                 reorder: int | None = None, threads: int = 1):
  """(scores float32 [B, k], rows int64 [B, k]) with query-time overrides; NaN marks a miss."""
  pre = None if reorder is None else max(reorder, k)
  if threads > 1 and len(queries) >= 2 * 64:
    idx, dist = searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
        leaves_to_search=leaves_to_search, batch_size=64)
  else:
    idx, dist = searcher.search_batched(queries, final_num_neighbors=k,
                                        pre_reorder_num_neighbors=pre,
                                        leaves_to_search=leaves_to_search)
  return np.asarray(dist, np.float32), np.asarray(idx, np.int64)


def leaf_candidates(n: int) -> list[int]:
  """Tree sizes to try: 1, 2 and 4 x sqrt(N), at most N / 50 rows a leaf, >= 1.3x apart."""
  if n < BRUTE_FORCE_BELOW:
    return []
  cap = max(2, n // 50)
  kept = []
  for leaves in sorted({max(2, min(cap, round(f * math.sqrt(n)))) for f in (1, 2, 4)}):
    if not kept or leaves >= 1.3 * kept[-1]:
      kept.append(leaves)
  return kept


def search_grid(num_leaves: int, n: int, k: int) -> tuple[list[int], list[int]]:
  """(leaves_to_search ascending, reorder sizes ascending) to try on a tree of num_leaves."""
  fractions = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0)
  leaves = sorted({max(1, min(num_leaves, round(f * num_leaves))) for f in fractions})
  reorders = sorted({min(n, max(k, r)) for r in (50, 100, 200, 400)})
  return leaves, reorders


def autotune(database: np.ndarray, tune_queries: np.ndarray, holdout_queries: np.ndarray,
             target_recall: float = 0.95, k: int = 10, threads: int | None = None,
             leaf_options: list[int] | None = None, margin: float = 0.003,
             qps_seconds: float = 0.3, exact: ExactSearcher | None = None,
             keep_searchers: bool = False) -> dict:
  """Chooses a ScaNN config for `target_recall` on tune_queries; measures it on holdout_queries.

  Per tree size, for each reorder size, leaves_to_search grows until Recall@k on tune_queries
  clears the target by max(margin, 2 standard errors of that mean) (more leaves only cost time;
  the margin makes the choice hold on other queries too); the first such config is timed. The
  fastest timed config wins; if none clears the target, the highest-recall one does. The winner's
  recall and QPS are then measured again on the held-out queries, which played no part in the
  choice; `met_target` reports the held-out recall.

  Returns {"searcher", "params", "tune": {recall, qps}, "holdout": {recall, qps, exact_qps},
  "met_target", "trials": [...], "threads", "searchers" (by num_leaves, if keep_searchers),
  "build_seconds" (by num_leaves)}.
  """
  n = len(database)
  threads = threads or os.cpu_count() or 1
  k = min(k, n)
  exact = exact or ExactSearcher(database)
  tune_exact, _ = exact.search(tune_queries, k)
  leaf_options = leaf_candidates(n) if leaf_options is None else leaf_options
  trials, best, searchers, build_seconds = [], None, {}, {}

  def clears(recalls: np.ndarray) -> bool:
    stderr = recalls.std() / np.sqrt(len(recalls))
    return bool(recalls.mean() >= target_recall + max(margin, 2.0 * stderr))

  def consider(trial, searcher):
    nonlocal best
    meets = trial["clears"]
    key = (meets, trial["qps"] if meets else trial["recall"])
    if best is None or key > best[0]:
      best = (key, trial, searcher)

  if not leaf_options:   # tiny database: exact scoring is both exact and fast
    searcher = build_scann(database, k, None, threads=threads)
    _, rows = scann_search(searcher, tune_queries, k, threads=threads)
    recalls = recall_per_query(tune_queries, database, rows, tune_exact)
    trial = {"algorithm": "brute_force", "num_leaves": None, "leaves_to_search": None,
             "reorder": None, "recall": float(recalls.mean()), "clears": clears(recalls)}
    trial["qps"] = measure_qps(lambda q: scann_search(searcher, q, k, threads=threads),
                               tune_queries, qps_seconds)
    trials.append(trial)
    consider(trial, searcher)
  for num_leaves in leaf_options:
    t0 = time.time()
    searcher = build_scann(database, k, num_leaves, threads=threads)
    build_seconds[num_leaves] = round(time.time() - t0, 2)
    log.info("scann tree: %d rows, %d leaves built in %.1fs", n, num_leaves, time.time() - t0)
    if keep_searchers:
      searchers[num_leaves] = searcher
    leaves_grid, reorder_grid = search_grid(num_leaves, n, k)
    fallback = None
    for reorder in reorder_grid:
      met, previous, flat = None, -1.0, 0
      for leaves in leaves_grid:
        _, rows = scann_search(searcher, tune_queries, k, leaves, reorder, threads)
        recalls = recall_per_query(tune_queries, database, rows, tune_exact)
        trial = {"algorithm": "tree_ah", "num_leaves": num_leaves, "leaves_to_search": leaves,
                 "reorder": reorder, "recall": float(recalls.mean()),
                 "clears": clears(recalls), "qps": None}
        trials.append(trial)
        if trial["clears"]:
          met = trial
          break
        if fallback is None or trial["recall"] > fallback["recall"]:
          fallback = trial
        # Two steps without gain: this reorder size, not the leaves searched, limits recall.
        flat = flat + 1 if trial["recall"] < previous + 0.001 else 0
        if flat == 2:
          break
        previous = trial["recall"]
      if met is not None:
        met["qps"] = _scann_qps(searcher, tune_queries, met, k, threads, qps_seconds)
        consider(met, searcher)
    if not best or not best[0][0]:   # nothing met the target yet: keep the best recall
      fallback["qps"] = _scann_qps(searcher, tune_queries, fallback, k, threads, qps_seconds)
      consider(fallback, searcher)
    del searcher   # a losing tree is freed before the next one is built (1 GB at 1M x 256)
  _, chosen, searcher = best
  params = {key: chosen[key] for key in ("algorithm", "num_leaves", "leaves_to_search",
                                         "reorder")}
  holdout_exact, _ = exact.search(holdout_queries, k)
  _, rows = scann_search(searcher, holdout_queries, k, params["leaves_to_search"],
                         params["reorder"], threads)
  holdout = {"recall": recall_at_k(holdout_queries, database, rows, holdout_exact),
             "qps": _scann_qps(searcher, holdout_queries, params, k, threads, qps_seconds),
             "exact_qps": measure_qps(lambda q: exact.search(q, k), holdout_queries,
                                      qps_seconds, min_repeats=1)}
  return {"searcher": searcher, "params": params,
          "tune": {"recall": chosen["recall"], "qps": chosen["qps"],
                   "queries": len(tune_queries)},
          "holdout": {**holdout, "queries": len(holdout_queries)},
          "met_target": holdout["recall"] >= target_recall, "trials": trials,
          "threads": threads, "searchers": searchers, "build_seconds": build_seconds}


def _scann_qps(searcher, queries, params, k, threads, seconds):
  return measure_qps(lambda q: scann_search(searcher, q, k, params["leaves_to_search"],
                                            params["reorder"], threads), queries, seconds)
