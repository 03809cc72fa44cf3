"""Full-corpus retrieval metrics against plain loops, and the BM25 baseline wrapper."""

import numpy as np
import pytest

from omnisage.train.evaluators.corpus import corpus_metrics, reference_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_metrics_match_reference_loops(seed):
  rng = np.random.default_rng(seed)
  n_q, n_c = 37, 60
  # Integer scores in a small range: many ties, which is where the two forms can disagree.
  scores = rng.integers(0, 6, (n_q, n_c)).astype(np.float32)
  positives = [rng.choice(n_c, rng.integers(1, 14), replace=False).tolist() for _ in range(n_q)]
  got = corpus_metrics(lambda rows: scores[rows], positives, k=10, block=8)
  want = reference_metrics(scores, positives, k=10)
  # Under ties the top-k set of recall@k is ambiguous; pair_recall@k is not (ties go to the
  # positive), so it must match exactly. recall@k is checked with distinct scores below.
  assert got["pair_recall@10"] == pytest.approx(want["pair_recall@10"], abs=1e-12)
  assert got["pairs"] == sum(len(p) for p in positives)


def test_corpus_metrics_exact_with_distinct_scores():
  rng = np.random.default_rng(5)
  scores = rng.standard_normal((50, 80))
  positives = [rng.choice(80, rng.integers(1, 15), replace=False).tolist() for _ in range(50)]
  got = corpus_metrics(lambda rows: scores[rows], positives, k=10, block=7)
  want = reference_metrics(scores, positives, k=10)
  assert got["recall@10"] == pytest.approx(want["recall@10"], abs=1e-12)
  assert got["pair_recall@10"] == pytest.approx(want["pair_recall@10"], abs=1e-12)


def test_hand_computed_case():
  # Query 0: positives {0, 3}; corpus order by score: 1, 0, 2, 3. With k=2: top2 = {1, 0} ->
  # recall 1/2. Pair ranks: item 0 beaten by {1} -> 2 <= 2 hit; item 3 beaten by {1, 2} (item 0 is
  # a positive, excluded) -> rank 3, miss.
  scores = np.array([[0.8, 0.9, 0.5, 0.1]])
  m = corpus_metrics(lambda rows: scores[rows], [[0, 3]], k=2)
  assert m["recall@2"] == 0.5 and m["pair_recall@2"] == 0.5


def test_queries_without_positives_are_refused():
  with pytest.raises(ValueError, match="positive"):
    corpus_metrics(lambda rows: np.zeros((len(rows), 3)), [[0], []])


def test_bm25_ranks_the_matching_title_first():
  from omnisage.baselines.bm25 import BM25Index
  titles = ["cordless drill with battery", "angle bracket steel", "ceiling fan white",
            "drill bits set", "garden hose 50 ft"]
  bm25 = BM25Index(titles)
  scores = bm25.scores(["steel brackets", "the", "drilling"])
  assert scores.shape == (3, 5)
  assert int(np.argmax(scores[0])) == 1            # stemming: brackets -> bracket
  assert not scores[1].any()                       # a stopword-only query matches nothing
  assert set(np.flatnonzero(scores[2])) == {0, 3}  # drilling -> drill
  assert bm25.top_k(["garden hose"], k=2)[0, 0] == 4
