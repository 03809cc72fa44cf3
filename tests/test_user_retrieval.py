"""The per-user temporal split, the user -> item metrics and the EASE / item-kNN baselines
against plain loops and the closed forms they stand for."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from omnisage.baselines.ease import ease_weights
from omnisage.baselines.popularity import item_knn_weights
from omnisage.data.user_split import per_user_split, validation_split
from omnisage.train.evaluators.user_retrieval import user_metrics


def engagements(seed=0, users=12, items=30, rows=200):
  rng = np.random.default_rng(seed)
  u = rng.integers(0, users, rows)
  i = rng.integers(0, items, rows)
  t = rng.integers(0, 50, rows)   # many ties in time
  return np.array([f"u{x}" for x in u], object), i, t


def test_split_vs_loop():
  users, items, times = engagements()
  split = per_user_split(users, items, times, test_fraction=0.2, min_history=2)
  for user in sorted(set(users)):
    rows = sorted((t, i) for uu, i, t in zip(users, items, times) if uu == user)
    seq = []
    for _, i in rows:   # time order, ties by item id; an item engaged twice counts once
      if i not in seq:
        seq.append(i)
    n_test = max(1, math.floor(0.2 * len(seq)))
    if len(seq) - n_test < 2:
      assert user not in split.test
      continue
    assert split.history[user].tolist() == seq[:-n_test]
    assert split.test[user].tolist() == seq[-n_test:]
  assert split.skipped["too_few_engagements"] == len(set(users)) - len(split.test)
  val = validation_split(split, 0.2, 1)
  for user in val.test:   # the same cut inside the history, never touching the test items
    assert val.history[user].tolist() + val.test[user].tolist() == split.history[user].tolist()
  with pytest.raises(ValueError, match="test_fraction"):
    per_user_split(users, items, times, test_fraction=1.0)


def reference_metrics(scores, seen, positives, k):
  recalls, ndcgs = [], []
  for u in range(len(positives)):
    order = [j for j in sorted(range(scores.shape[1]), key=lambda j: (-scores[u, j], j))
             if j not in set(seen[u])]
    top = order[:k]
    recalls.append(len(set(top) & set(positives[u])) / min(len(positives[u]), k))
    dcg = sum(1 / math.log2(r + 2) for r, j in enumerate(order[:10]) if j in positives[u])
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(positives[u]), 10)))
    ndcgs.append(dcg / idcg)
  return np.array(recalls), np.array(ndcgs)


def test_metrics_vs_loop():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(9, 40)).round(1)   # ties
  seen = [rng.choice(40, rng.integers(0, 6), replace=False).tolist() for _ in range(9)]
  positives = [rng.choice([j for j in range(40) if j not in s], rng.integers(1, 5),
                          replace=False).tolist() for s in seen]
  m = user_metrics(scores, seen, positives, ks=(5, 10))
  for k in (5, 10):
    recall, ndcg = reference_metrics(scores, seen, positives, k)
    assert m[f"recall@{k}"] == pytest.approx(recall.mean())
    assert m[f"recall@{k}_se"] == pytest.approx(recall.std(ddof=1) / 3)
  assert m["ndcg@10"] == pytest.approx(ndcg.mean())
  assert m["users"] == 9
  # A seen positive cannot be recommended; a NaN model scores nothing.
  assert user_metrics(np.full((1, 5), np.nan), [[]], [[1]], ks=(3,))["recall@3"] == 0.0


def test_ease_is_the_constrained_ridge_regression():
  rng = np.random.default_rng(2)
  x = (rng.random((60, 12)) < 0.3).astype(np.float64)
  lam = 3.0
  b = ease_weights(sp.csr_matrix(x), lam)
  assert np.allclose(np.diag(b), 0.0)
  for j in (0, 5, 11):   # column j: ridge regression of item j on every other item
    others = [i for i in range(12) if i != j]
    xo = x[:, others]
    want = np.linalg.solve(xo.T @ xo + lam * np.eye(11), xo.T @ x[:, j])
    np.testing.assert_allclose(b[others, j], want, rtol=1e-8, atol=1e-10)
  with pytest.raises(ValueError, match="lambda"):
    ease_weights(x, 0.0)


def test_item_knn_is_cosine_of_user_sets():
  x = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.float64)
  s = item_knn_weights(x)
  for a in range(3):
    for c in range(3):
      want = 0.0 if a == c else x[:, a] @ x[:, c] / np.sqrt(x[:, a].sum() * x[:, c].sum())
      assert s[a, c] == pytest.approx(want)
