"""Hybrid retrieval: one ranked list from a dense (embedding) and a lexical (BM25) list.

Two fusions, both over the union of the two top lists of one query:
  weighted  score = w * dense' + (1 - w) * lexical', where each list's scores are min-max
            normalised to [0, 1] over the candidates it returned and a candidate one list did not
            return gets 0 from it. `w` is tuned on validation queries (`tune_weight`) and stored in
            the index (index.json "lexical.fusion"). Convex combination of normalised scores:
            the standard strong baseline of hybrid search (Bruch et al., "An Analysis of Fusion
            Functions for Hybrid Retrieval", TOIS 2023).
  rrf       score = sum over lists of 1 / (60 + rank), rank 1-based: reciprocal rank fusion
            (Cormack et al., SIGIR 2009), the parameter-free option.
Ties: the higher dense score, then the lower row.

Usage:
  scores, rows = fuse((dense_scores, dense_rows), (lex_scores, lex_rows), k=10, weight=0.6)
  weight, table = tune_weight(dense, lexical, positives, grid=(0.0, 0.1, ..., 1.0))
"""

import numpy as np

RRF_K = 60
METHODS = ("weighted", "rrf")


def _normalised(scores: np.ndarray) -> np.ndarray:
  finite = np.isfinite(scores)
  if not finite.any():
    return np.zeros_like(scores, np.float64)
  lo, hi = scores[finite].min(), scores[finite].max()
  out = np.where(finite, (scores - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
  return out.astype(np.float64)


def fuse_one(dense: tuple, lexical: tuple, k: int, method: str = "weighted",
             weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(scores float32 [k'], rows int64 [k']) of one query from its two (scores, rows) lists."""
  if method not in METHODS:
    raise ValueError(f"fusion method must be one of {METHODS}, got {method!r}")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
  d_scores, d_rows = (np.asarray(x) for x in dense)
  l_scores, l_rows = (np.asarray(x) for x in lexical)
  candidates = np.unique(np.concatenate([d_rows, l_rows]).astype(np.int64))
  fused = np.zeros(len(candidates), np.float64)
  dense_of = np.full(len(candidates), -np.inf)
  for scores, rows, w in ((d_scores, d_rows, weight), (l_scores, l_rows, 1.0 - weight)):
    where = np.searchsorted(candidates, rows.astype(np.int64))
    if method == "weighted":
      fused[where] += w * _normalised(scores.astype(np.float64))
    else:
      fused[where] += 1.0 / (RRF_K + np.arange(1, len(rows) + 1))
    if rows is d_rows:
      dense_of[where] = scores
  order = np.lexsort((candidates, -dense_of, -fused))[:k]
  return fused[order].astype(np.float32), candidates[order]


def fuse(dense: tuple, lexical: tuple, k: int, method: str = "weighted",
         weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Batched `fuse_one`: lists of [B, *] (scores, rows) -> ([B, k] scores, [B, k] rows), rows -1
  and scores -inf where a query has fewer than k candidates."""
  d_scores, d_rows = dense
  l_scores, l_rows = lexical
  out_s = np.full((len(d_rows), k), -np.inf, np.float32)
  out_r = np.full((len(d_rows), k), -1, np.int64)
  for i in range(len(d_rows)):
    s, r = fuse_one((d_scores[i], d_rows[i]), (l_scores[i], l_rows[i]), k, method, weight)
    out_s[i, :len(s)], out_r[i, :len(r)] = s, r
  return out_s, out_r


def recall_at(rows: np.ndarray, positives: list, k: int = 10) -> float:
  """Mean over queries of |top-k ∩ positives| / min(|positives|, k)."""
  return float(np.mean([len(set(r[:k].tolist()) & set(p)) / min(len(p), k)
                        for r, p in zip(rows, positives)]))


def tune_weight(dense: tuple, lexical: tuple, positives: list, k: int = 10,
                grid=tuple(np.round(np.linspace(0.0, 1.0, 11), 2))) -> tuple[float, dict]:
  """The weight of `grid` with the best recall@k on these (validation) queries, ties to the
  larger weight; and {weight: recall@k}."""
  table = {float(w): recall_at(fuse(dense, lexical, k, "weighted", float(w))[1], positives, k)
           for w in grid}
  best = max(table, key=lambda w: (table[w], w))
  return best, table
