"""Hybrid retrieval (omnisage/serving/index/hybrid.py, scann_index.py, the query service): fusion
against a plain reference, the BM25 index built and checksummed with the dense one, weight tuning,
and /v1/search's mode over real HTTP."""

import json
import os

import httpx
import numpy as np
import pytest

from omnisage.baselines.bm25 import BM25Index
from omnisage.data.tokenizer import WordPieceTokenizer
from omnisage.serving.bundle.loader import load_bundle
from omnisage.serving.index import hybrid
from omnisage.serving.index.scann_index import load_index, set_fusion
from omnisage.serving.omnisearchsage.service import create_app
from tests.helpers import build_tiny_index, running


def reference_fuse(dense, lexical, k, method, weight):
  """Plain dictionaries, one candidate at a time."""
  def norm(scores):
    lo, hi = min(scores), max(scores)
    return [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores]
  fused, dense_of = {}, {}
  for (scores, rows), w in ((dense, weight), (lexical, 1 - weight)):
    values = norm(list(scores)) if method == "weighted" else \
        [1 / (60 + r) for r in range(1, len(rows) + 1)]
    for row, value in zip(rows, values):
      fused[int(row)] = fused.get(int(row), 0.0) + (w * value if method == "weighted" else value)
  for s, r in zip(*dense):
    dense_of[int(r)] = s
  order = sorted(fused, key=lambda r: (-fused[r], -dense_of.get(r, -np.inf), r))[:k]
  return [fused[r] for r in order], order


@pytest.mark.parametrize("method, weight", [("weighted", 0.3), ("weighted", 1.0), ("rrf", 0.5)])
def test_fuse_vs_reference(method, weight):
  rng = np.random.default_rng(0)
  for _ in range(20):
    d_rows = rng.choice(40, 12, replace=False)
    l_rows = rng.choice(40, 12, replace=False)
    dense = (np.sort(rng.normal(size=12))[::-1], d_rows)
    lexical = (np.sort(rng.gamma(2.0, size=12))[::-1], l_rows)
    scores, rows = hybrid.fuse_one(dense, lexical, 8, method, weight)
    ref_scores, ref_rows = reference_fuse(dense, lexical, 8, method, weight)
    assert rows.tolist() == ref_rows
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_weight_one_is_dense_and_tuning_prefers_the_useful_list():
  dense = (np.array([[0.9, 0.5, 0.1]]), np.array([[4, 5, 6]]))
  lexical = (np.array([[7.0, 3.0, 1.0]]), np.array([[1, 2, 3]]))
  assert hybrid.fuse(dense, lexical, 3, "weighted", 1.0)[1].tolist() == [[4, 5, 6]]
  assert hybrid.fuse(dense, lexical, 2, "weighted", 0.0)[1].tolist() == [[1, 2]]
  weight, table = hybrid.tune_weight(dense, lexical, [[1, 2]], k=2, grid=(0.0, 0.5, 1.0))
  assert weight == 0.0 and table[0.0] == 1.0 and table[1.0] == 0.0
  with pytest.raises(ValueError, match="weight must be in"):
    hybrid.fuse_one((dense[0][0], dense[1][0]), (lexical[0][0], lexical[1][0]), 2, "weighted", 2)


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory):
  bundle_dir, embeddings, index_dir = build_tiny_index(tiny_bundle, tmp_path_factory.mktemp("hyb"))
  return bundle_dir, index_dir


def test_index_holds_a_checksummed_bm25_index(world):
  _, index_dir = world
  indexes = load_index(index_dir)
  products = indexes["products"]
  assert products.lexical is not None and products.fusion["method"] == "weighted"
  with open(os.path.join(index_dir, "products", "index.json")) as f:
    files = json.load(f)["files"]
  assert any(name.startswith("bm25/") for name in files)   # verified like ScaNN's assets
  query = next(t for t in products.titles if t)   # a real title: BM25 must find it first
  scores, rows = products.lexical_search([query], 5)
  ref = BM25Index([t or "" for t in products.titles]).scores([query])[0]
  assert rows[0, 0] == int(np.argmax(ref)) and scores[0, 0] == pytest.approx(ref.max(), rel=1e-5)
  set_fusion(os.path.join(index_dir, "products"), "weighted", 0.7, {"queries": 3})
  assert load_index(index_dir)["products"].fusion == {"method": "weighted", "weight": 0.7,
                                                      "tuned": True, "tuned_on": {"queries": 3}}


def test_search_modes_over_http(world):
  bundle_dir, index_dir = world
  bundle = load_bundle(bundle_dir)
  indexes = load_index(index_dir)
  app = create_app(bundle, indexes, tokenizer=WordPieceTokenizer.from_bundle(bundle), max_batch=4)
  title = next(t for t in indexes["products"].titles if t)
  with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
    found = {}
    for mode in ("dense", "lexical", "hybrid"):
      r = client.post("/v1/search", json={"query": title, "k": 5, "types": ["products"],
                                          "mode": mode})
      assert r.status_code == 200, r.text
      found[mode] = [hit["id"] for hit in r.json()["results"]["products"]]
      assert len(found[mode]) == 5
    assert found["lexical"][0] == indexes["products"].ids[
        int(indexes["products"].lexical_search([title], 1)[1][0, 0])]
    assert set(found["hybrid"]) <= set(found["dense"]) | set(
        indexes["products"].ids[r] for r in indexes["products"].lexical_search([title], 100)[1][0])
    bad = client.post("/v1/search", json={"query": title, "mode": "fuzzy"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "mode"
