"""Recall@k of home-feed recommenders on the MovieLens time split, and two baselines (SPEC §3).

Protocol (omnisage/data/twotower/examples.py): for each evaluation user, every catalogue item is
scored from pre-cut data only; the items the user rated before the cut are excluded from the
ranking (a feed does not re-recommend what was already watched, and MovieLens has at most one
rating per (user, movie), so they can never be positives); the positives are the items rated at
or after the cut. Recall@k = |top-k ∩ positives| / min(|positives|, k), averaged over users
(omnisage/train/retrieval_metrics.corpus_metrics: the min() keeps heavy users, with hundreds of
post-cut ratings, from capping their recall far below 1).

Baselines:
  popularity     the same list for everyone: pre-cut ratings in the trailing window (ties by
                 all pre-cut ratings), or all pre-cut ratings (ties by the window count);
  co-occurrence  item-item: score(u, j) = sum over u's pre-cut items h of C[h, j], C[h, j] = the
                 number of users who rated both before the cut. As a matrix product over the
                 binary user x item matrix X: S = (X_u X^T) X. The cosine variant divides C[h, j]
                 by sqrt(n_h n_j) (item-based collaborative filtering).

Usage:
  table = recall_table({"popularity": popularity_scores(cat, users)}, users, ks=(50, 100))
"""

import numpy as np
import scipy.sparse as sp

from omnisage.train.evaluators.corpus import corpus_metrics


def recall(scores: np.ndarray, users: dict, ks=(50, 100)) -> dict:
  """scores [U, N]: column j = catalogue index j + 1. Returns {"recall@k": float, "users": U}."""
  scores = np.array(scores, np.float64)
  if scores.shape[0] != len(users["positives"]):
    raise ValueError(f"{scores.shape[0]} score rows for {len(users['positives'])} users")
  for row, seen in enumerate(users["seen"]):
    scores[row, np.asarray(seen, np.int64) - 1] = -np.inf
  positives = [np.asarray(p, np.int64) - 1 for p in users["positives"]]
  out = {}
  for k in ks:
    out[f"recall@{k}"] = corpus_metrics(lambda rows: scores[rows], positives, k=k)[f"recall@{k}"]
  out["users"] = len(positives)
  return out


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
