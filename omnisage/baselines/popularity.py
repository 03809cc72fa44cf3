"""Non-learned home-feed baselines (SPEC §3 evaluation): popularity and item co-occurrence.

  popularity     the same list for everyone: pre-cut ratings in the trailing window (ties by
                 all pre-cut ratings), or all pre-cut ratings (ties by the window count);
  co-occurrence  item-item: score(u, j) = sum over u's pre-cut items h of C[h, j], C[h, j] = the
                 number of users who rated both before the cut. As a matrix product over the
                 binary user x item matrix X: S = (X_u X^T) X. The cosine variant divides C[h, j]
                 by sqrt(n_h n_j) (item-based collaborative filtering, Sarwar et al. 2001).

Scores are [U, N] with column j = catalogue index j + 1, as omnisage.train.evaluators.twotower
ranks them.

Usage: `recall(popularity_scores(catalogue, len(users["seen"])), users)`.
"""

import numpy as np
import scipy.sparse as sp


def popularity_scores(catalogue, num_users: int, by: str = "window") -> np.ndarray:
  """[U, N]: the same popularity score for every user (ties broken by the other count)."""
  window = catalogue.count_window[1:].astype(np.float64)
  total = catalogue.count_total[1:].astype(np.float64)
  first, second = (window, total) if by == "window" else (total, window)
  score = first + second / (second.max() + 1.0)
  return np.broadcast_to(score, (num_users, len(score)))


def interaction_matrix(users: np.ndarray, items: np.ndarray, num_items: int):
  """Binary CSR user x item matrix (rows: sorted unique users) and the user -> row map."""
  ids, rows = np.unique(users, return_inverse=True)
  x = sp.csr_matrix((np.ones(len(rows)), (rows, np.asarray(items) - 1)),
                    shape=(len(ids), num_items))
  x.data[:] = 1.0   # duplicates summed by the constructor become 1
  return x, {int(u): i for i, u in enumerate(ids)}


def cooccurrence_scores(train_users: np.ndarray, train_items: np.ndarray, users: dict,
                        num_items: int, cosine: bool = False) -> np.ndarray:
  """[U, N] item-item co-occurrence scores of the evaluation users from the pre-cut interactions
  (train_users, train_items: one row per pre-cut rating; items are catalogue indices)."""
  x, _ = interaction_matrix(train_users, train_items, num_items)
  rows, cols = [], []
  for i, seen in enumerate(users["seen"]):
    rows += [i] * len(seen)
    cols += [s - 1 for s in seen]
  history = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users["seen"]),
                                                                     num_items))
  if not cosine:
    return np.asarray(((history @ x.T) @ x).todense())
  norm = 1.0 / np.sqrt(np.maximum(np.asarray(x.sum(axis=0)).ravel(), 1.0))   # 1/sqrt(n_j)
  d = sp.diags(norm)
  return np.asarray((((history @ d) @ x.T) @ x @ d).todense())


def item_knn_weights(x) -> np.ndarray:
  """[items, items] cosine similarity of the items' user sets, zero diagonal (item-based kNN,
  Sarwar et al. 2001, all neighbours kept): scores(u) = x_u S."""
  x = sp.csr_matrix(x, dtype=np.float64)
  co = np.asarray((x.T @ x).todense())
  norm = np.sqrt(np.maximum(np.diag(co), 1e-12))
  s = co / norm[:, None] / norm[None, :]
  s[np.diag_indices_from(s)] = 0.0
  return s
