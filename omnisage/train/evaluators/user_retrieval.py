"""User -> item retrieval metrics on the per-user temporal split (omnisage/data/user_split.py).

Every catalogue item is ranked for each evaluated user; the items of the user's history are
excluded from the ranking (a feed does not re-recommend what was already engaged), and the
positives are the user's held-out items. Per user:
  Recall@k  |top-k ∩ positives| / min(|positives|, k)
  NDCG@10   sum over hits at rank r <= 10 of 1 / log2(r + 1), divided by the same sum for the
            ideal ranking (all positives first): binary relevance (Järvelin & Kekäläinen 2002)
Each metric is the mean over users with its standard error (sample std / sqrt(users)), so two
methods can be compared with their noise in view.

Usage:
  m = user_metrics(scores, seen, positives, ks=(10, 50, 100))   # scores [U, N] (column = item)
  m["recall@50"], m["recall@50_se"], m["ndcg@10"], m["users"]
"""

import numpy as np

KS = (10, 50, 100)


def user_metrics(scores: np.ndarray, seen: list, positives: list, ks=KS,
                 ndcg_k: int = 10) -> dict:
  """Metrics of a [U, N] score matrix; seen[u], positives[u]: item columns of user u."""
  scores = np.array(scores, np.float64)
  if scores.ndim != 2 or scores.shape[0] != len(positives) or len(seen) != len(positives):
    raise ValueError(f"scores {scores.shape} for {len(positives)} users ({len(seen)} seen lists)")
  if any(len(p) == 0 for p in positives):
    raise ValueError("every evaluated user needs at least one held-out item")
  scores = np.where(np.isfinite(scores), scores, -np.inf)   # a non-finite score ranks last
  for u, items in enumerate(seen):
    scores[u, np.asarray(items, np.int64)] = -np.inf
  depth = min(max(max(ks), ndcg_k), scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
  ranked_finite = np.isfinite(np.take_along_axis(scores, top, axis=1))
  per_user = {f"recall@{k}": [] for k in ks}
  per_user[f"ndcg@{ndcg_k}"] = []
  discount = 1.0 / np.log2(np.arange(2, depth + 2))
  for u, pos in enumerate(positives):
    hit = np.isin(top[u], np.asarray(pos, np.int64)) & ranked_finite[u]
    for k in ks:
      per_user[f"recall@{k}"].append(hit[:k].sum() / min(len(pos), k))
    ideal = discount[:min(len(pos), ndcg_k)].sum()
    per_user[f"ndcg@{ndcg_k}"].append((hit[:ndcg_k] * discount[:ndcg_k]).sum() / ideal)
  out = {"users": len(positives)}
  for name, values in per_user.items():
    values = np.asarray(values, np.float64)
    out[name] = float(values.mean())
    out[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 \
        else 0.0
  return out
