"""Retrieval metrics of the real-data benchmarks, over a full corpus (datasets README protocol).

Two forms, both from a score matrix of queries x corpus:
  - `recall@k` (per query): |top-k ∩ positives| / min(|positives|, k), averaged over queries;
  - `pair_recall@k` (the paper's form, SPEC §1 "Evaluation"): for each (query, positive) pair, the
    positive is ranked against the whole corpus minus that query's OTHER positives:
    rank = 1 + #{non-positive items scoring strictly higher}; the metric is the mean of rank <= k
    over pairs. Ties go to the positive: that reproduces the README's BM25 figure (0.530), and only
    matters for scorers with many exact ties (BM25 gives 0 to every item sharing no term).

Scores come block by block from a callback, so a 2k x 55k matrix never has to exist at once and
any scorer (BM25, a dot product, an ANN) plugs in.

Usage:
  m = corpus_metrics(lambda rows: q[rows] @ corpus.T, positives=[[3, 7], [1]], k=10)
  m["recall@10"], m["pair_recall@10"]
"""

import functools
from collections.abc import Callable, Sequence

import numpy as np

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.pipeline import packed_queries, read_pairs
from omnisage.train.evaluators.recall import TowerRunner, query_tower_fn, require_finite


def corpus_metrics(score_block: Callable[[np.ndarray], np.ndarray],
                   positives: Sequence[Sequence[int]], k: int = 10, block: int = 256) -> dict:
  """recall@k and pair_recall@k of queries 0..n-1 whose positives are corpus row indices.

  score_block(rows) -> [len(rows), N] float scores of those queries against the whole corpus.
  Queries with no positive are an error (the protocol leaves them out before calling).
  """
  n = len(positives)
  if any(len(p) == 0 for p in positives):
    raise ValueError("every query needs at least one positive")
  per_query, hits = np.zeros(n), []
  for start in range(0, n, block):
    rows = np.arange(start, min(start + block, n))
    scores = np.asarray(score_block(rows), np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(rows):
      raise ValueError(f"score_block returned shape {scores.shape} for {len(rows)} queries")
    finite = np.isfinite(scores)
    scores = np.where(finite, scores, -np.inf)   # a non-finite score ranks last
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    for i, r in enumerate(rows):
      pos = np.unique(np.asarray(positives[r], np.int64))
      # A top-k slot counts only if its score is finite (with -inf scores in the top k the
      # list ran out of rankable items).
      per_query[r] = (np.isin(top[i], pos) & finite[i, top[i]]).sum() / min(len(pos), k)
      s = scores[i]
      others = np.ones(len(s), bool)
      others[pos] = False
      # Sorted non-positive scores: #> each positive's score by one binary search per positive.
      neg = np.sort(s[others])
      beaten_by = len(neg) - np.searchsorted(neg, s[pos], side="right")
      hits.extend(((1 + beaten_by) <= k) & finite[i, pos])
  return {f"recall@{k}": float(per_query.mean()), f"pair_recall@{k}": float(np.mean(hits)),
          "queries": n, "pairs": len(hits)}


def reference_metrics(scores: np.ndarray, positives: Sequence[Sequence[int]], k: int = 10) -> dict:
  """The same metrics by the plainest loops (for tests): full sort per query, one pair at a time."""
  recalls, hits = [], []
  for i, pos in enumerate(positives):
    pos = set(int(p) for p in pos)
    order = sorted(range(scores.shape[1]), key=lambda j: -scores[i, j])
    recalls.append(len(pos & set(order[:k])) / min(len(pos), k))
    for p in pos:
      rank = 1 + sum(1 for j in range(scores.shape[1])
                     if j not in pos and scores[i, j] > scores[i, p])
      hits.append(rank <= k)
  return {f"recall@{k}": float(np.mean(recalls)), f"pair_recall@{k}": float(np.mean(hits))}


class Evaluator:
  """Full-corpus metrics of one OmniSearchSage task on its prepared eval pairs.

  Each distinct eval query (its token row) is scored against EVERY entity of the task's kind, its
  positives are the entities it was paired with; recall@k and pair_recall@k as above. Heavier
  than the paper-protocol `recall` evaluator (the whole corpus goes through the tower), so a
  config lists it where that is affordable:
    config.evals = {"recall": {"type": "recall"},
                    "corpus": {"type": "corpus", "task": "q2product", "k": 10}}
  """

  def __init__(self, config, *, prepared: str, stores: dict, mesh, task: str = "q2product",
               k: int = 10, **_):
    if task not in schema.TASK_ENTITY:
      raise ValueError(f"config.evals corpus task={task!r}: one of {sorted(schema.TASK_ENTITY)}")
    self.task, self.k, self.kind = task, int(k), schema.TASK_ENTITY[task]
    pairs = read_pairs(prepared, "eval", task, config.eval.max_pairs, config.seed,
                       config.data.batch_query_len, packed_queries(stores, config.data))
    self.queries, inverse = np.unique(pairs["query_tokens"], axis=0, return_inverse=True)
    self.positives = [[] for _ in range(len(self.queries))]
    for row, entity in zip(inverse.ravel(), pairs["pos_ids"]):
      self.positives[row].append(int(entity))
    self.towers = TowerRunner(stores, mesh, config.eval.batch_size)
    self.corpus_ids = np.arange(stores[self.kind].size)

  def run(self, statics, params) -> dict[str, float]:
    q = require_finite(f"{self.task} query", self.towers.run(
        functools.partial(query_tower_fn, statics, params),
        {"tokens": self.queries.astype(np.int32)}))
    corpus = require_finite(f"{self.kind} corpus",
                            self.towers.embed(statics, params, self.kind, self.corpus_ids))
    m = corpus_metrics(lambda rows: q[rows] @ corpus.T, self.positives, k=self.k)
    return {f"corpus/{self.task}/{name}": float(m[name])
            for name in (f"recall@{self.k}", f"pair_recall@{self.k}")}
