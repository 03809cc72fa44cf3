"""The retrieval index: exact top-k vs NumPy, tuning to a target recall, save/load, refusals."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.synthetic_embeddings import clustered_embeddings
from omnisage.serving.index import ann
from omnisage.serving.index.ann import exact_topk
from omnisage.serving.index.scann_index import (
  BUNDLE_KEY,
  IndexError_,
  build_index,
  load_index,
  read_embeddings,
  tuning_queries,
  write_kind_index,
)
from tests.helpers import last_json, run_launch

DIM = 32


def write_shards(kind_dir, vectors, titles, ids=None, shards=2, bundle=b"test-bundle"):
  """Writes `launch.py embed`-format shards: entity_index, [id], title, embedding."""
  os.makedirs(kind_dir, exist_ok=True)
  bounds = np.linspace(0, len(vectors), shards + 1).astype(int)
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    columns = {"entity_index": pa.array(np.arange(lo, hi, dtype=np.int32))}
    if ids is not None:
      columns["id"] = pa.array(ids[lo:hi], pa.string())
    columns["title"] = pa.array(titles[lo:hi], pa.string())
    flat = pa.array(vectors[lo:hi].reshape(-1), pa.float32())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    table = pa.table(columns).replace_schema_metadata({BUNDLE_KEY: bundle})
    pq.write_table(table, os.path.join(kind_dir, f"shard-{i:05d}.parquet"))


def write_embeddings_dir(root, pins=3000, products=1200, queries=800, dim=DIM, seed=0):
  """pins/products/queries kinds of clustered unit vectors; products is small (brute force)."""
  everything, _ = clustered_embeddings(pins + products + queries, dim, 0, seed=seed,
                                       num_clusters=40, noise=0.05)
  parts = np.split(np.random.default_rng(seed).permutation(everything), [pins, pins + products])
  for kind, vectors in zip(("pins", "products", "queries"), parts):
    titles = [f"{kind} title {i}" for i in range(len(vectors))]
    ids = None if kind == "queries" else [f"{kind[:-1]}-{i}" for i in range(len(vectors))]
    write_shards(os.path.join(root, kind), vectors, titles, ids)
  return str(root)


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory):
  return write_embeddings_dir(tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="module")
def built(embeddings_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("index"))
  summary = build_index(embeddings_dir, out, target_recall=0.95, tune_queries_per_split=400,
                        qps_seconds=0.05)
  return out, summary


def test_exact_topk_vs_numpy():
  rng = np.random.default_rng(1)
  database = rng.standard_normal((5000, DIM)).astype(np.float32)
  queries = rng.standard_normal((150, DIM)).astype(np.float32)
  scores_ref = queries @ database.T
  rows_ref = np.argsort(-scores_ref, axis=1, kind="stable")[:, :10]
  # Small chunks and query blocks: padding of the last chunk and block is exercised.
  for searcher in (ann.ExactSearcher(database, chunk_rows=1024, query_block=64), None):
    scores, rows = (searcher.search(queries, 10) if searcher
                    else exact_topk(queries, database, 10))
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (150, 10)
    np.testing.assert_array_equal(rows, rows_ref)   # continuous random data: no ties
    np.testing.assert_allclose(scores, np.take_along_axis(scores_ref, rows_ref, 1), atol=1e-4)
  with pytest.raises(ValueError, match="k must be"):
    exact_topk(queries, database[:5], 10)


def test_build_index_meets_target(built):
  out, summary = built
  kinds = summary["kinds"]
  assert set(kinds) == {"pins", "products", "queries"}
  for kind, info in kinds.items():
    assert info["met_target"], (kind, info)
    assert info["recall@10"] >= 0.95 and info["qps"] > 0 and info["exact_qps"] > 0
    assert info["dim"] == DIM and info["build_seconds"] > 0
  assert kinds["pins"]["size"] == 3000 and kinds["pins"]["params"]["algorithm"] == "tree_ah"
  # Under BRUTE_FORCE_BELOW rows the index scores exactly.
  assert kinds["products"]["params"]["algorithm"] == "brute_force"
  assert kinds["products"]["recall@10"] == 1.0
  info = json.load(open(os.path.join(out, "pins", "index.json")))
  assert info["tune_queries"] == "queries"   # the real query embeddings were used to tune
  assert info["source"]["bundle_params_sha256"] == "test-bundle"
  assert len(info["source"]["shards"]) == 2
  assert not [name for name in os.listdir(out) if name.startswith(".")]   # no temp dirs left


def test_loaded_index_searches(built, embeddings_dir):
  out, _ = built
  indexes = load_index(out)
  pins = indexes["pins"]
  data = read_embeddings(os.path.join(embeddings_dir, "pins"))
  assert pins.size == 3000 and pins.dim == DIM and pins.ids[7] == "pin-7"
  assert pins.titles[7] == "pins title 7" and pins.entity_index[7] == 7
  assert indexes["queries"].ids[3] == "queries title 3"   # queries: the text is the id
  queries = read_embeddings(os.path.join(embeddings_dir, "queries")).vectors[:100]
  scores, rows = pins.search(queries, 10)
  exact_scores, _ = exact_topk(queries, data.vectors, 10)
  assert ann.recall_at_k(queries, data.vectors, rows, exact_scores) >= 0.9
  np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, data.vectors[rows]),
                             atol=1e-4)   # reordered: the scores are exact inner products
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  # k above the size: every row, still best first.
  scores, rows = indexes["products"].search(queries[:3], 5000)
  assert rows.shape == (3, 1200) and sorted(rows[0]) == list(range(1200))
  with pytest.raises(ValueError, match=f"\\[B, {DIM}\\]"):
    pins.search(np.zeros((2, DIM + 1), np.float32), 10)


def test_save_load_round_trip(embeddings_dir, tmp_path):
  data = read_embeddings(os.path.join(embeddings_dir, "pins"))
  rng = np.random.default_rng(0)
  tune, holdout, source = tuning_queries(data.vectors, None, rng, per_split=100)
  assert source == "database_rows_with_noise"
  tuned = ann.autotune(data.vectors, tune, holdout, target_recall=0.9, leaf_options=[40],
                       qps_seconds=0.02)
  write_kind_index(str(tmp_path), "pins", data, tuned, 0.9, 10, source)
  loaded = load_index(str(tmp_path))["pins"]
  params = tuned["params"]
  for k in (1, 10, 25):
    expect = ann.scann_search(tuned["searcher"], holdout, k, params["leaves_to_search"],
                              params["reorder"])
    got = loaded.search(holdout, k)
    np.testing.assert_array_equal(got[1], expect[1])
    np.testing.assert_array_equal(got[0], expect[0])


def test_damaged_index_refused(built, tmp_path):
  out, _ = built
  broken = str(tmp_path / "broken")
  shutil.copytree(out, broken)
  items = os.path.join(broken, "pins", "items.parquet")
  table = pq.read_table(items)
  titles = table.column("title").to_pylist()
  titles[0] = "changed"
  pq.write_table(table.set_column(2, "title", pa.array(titles)), items)
  with pytest.raises(IndexError_, match="items.parquet: sha256 differs"):
    load_index(broken)

  shutil.rmtree(broken)
  shutil.copytree(out, broken)
  info_path = os.path.join(broken, "products", "index.json")
  info = json.load(open(info_path))
  info["dim"] = DIM * 2
  json.dump(info, open(info_path, "w"))
  with pytest.raises(IndexError_, match=f"dataset.npy: .*dim {DIM * 2}"):
    load_index(broken)
  with pytest.raises(IndexError_, match="index directory not found"):
    load_index(str(tmp_path / "nowhere"))
  assert issubclass(IndexError_, ValueError)


def test_bad_embeddings_refused(tmp_path):
  vectors = np.eye(4, DIM, dtype=np.float32)
  with pytest.raises(ValueError, match="no shard-"):
    read_embeddings(str(tmp_path / "empty"))
  write_shards(str(tmp_path / "nan"), np.where(vectors == 1, np.nan, vectors),
               list("abcd"), shards=1)
  with pytest.raises(ValueError, match=r"shard-00000.parquet: embedding of row 0 .*NaN"):
    read_embeddings(str(tmp_path / "nan"))
  write_shards(str(tmp_path / "dims"), vectors, list("abcd"), shards=1)
  write_shards(str(tmp_path / "dims2"), np.eye(4, 8, dtype=np.float32), list("abcd"), shards=1)
  os.rename(tmp_path / "dims2" / "shard-00000.parquet", tmp_path / "dims" / "shard-00001.parquet")
  with pytest.raises(ValueError, match="shard-00001.parquet: embedding dim 8 disagrees"):
    read_embeddings(str(tmp_path / "dims"))
  os.makedirs(tmp_path / "nocol")
  pq.write_table(pa.table({"entity_index": [1], "title": ["x"]}),
                 str(tmp_path / "nocol" / "shard-00000.parquet"))
  with pytest.raises(ValueError, match=r"shard-00000.parquet: no column\(s\) \['embedding'\]"):
    read_embeddings(str(tmp_path / "nocol"))


def test_launch_index(embeddings_dir, tmp_path):
  small = write_embeddings_dir(tmp_path / "emb", pins=2500, products=300, queries=300)
  result = run_launch("index", f"--embeddings={small}", f"--out={tmp_path / 'index'}",
                      "--target-recall=0.9")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["index"]
  assert set(summary["kinds"]) == {"pins", "products", "queries"}
  assert summary["kinds"]["pins"]["params"]["algorithm"] == "tree_ah"
  assert sorted(load_index(str(tmp_path / "index"))) == ["pins", "products", "queries"]

  result = run_launch("index", f"--embeddings={tmp_path / 'missing'}", f"--out={tmp_path / 'x'}")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr and "embeddings directory not found" in result.stderr
  assert "embeddings directory not found" in last_json(result)["index"]["error"]
