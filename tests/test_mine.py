"""Hard-negative mining (omnisage/train/omnisearchsage/mine.py): the rank window against a plain
loop, the mined table against the checkpoint's own ranking, resume after a kill, launch.py mine."""

import os

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

from omnisage.data.omnisearchsage.hard_negatives import HardNegatives
from omnisage.train.omnisearchsage.mine import (
  mine_hard_negatives,
  positives_by_query,
  top_ranked,
  window,
)
from omnisage.train.omnisearchsage.towers import TrainedTowers
from tests.helpers import common_flags, last_json, run_launch


def test_top_ranked_and_window_vs_loops():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, size=(4, 30)).astype(np.float32)   # many ties
  top = top_ranked(scores, 12)
  for i in range(4):
    expected = sorted(range(30), key=lambda j: (-scores[i, j], j))[:12]
    assert top[i].tolist() == expected
  row = np.arange(20)
  assert window(row, {3, 4, 11}, 2, 12, 4) == [2, 5, 6, 7]
  assert window(row, set(), 18, 40, 5) == [18, 19]


@pytest.fixture(scope="module")
def mined(tiny_bundle, tmp_path_factory):
  config, prepared, workdir, _, _ = tiny_bundle
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.prepared_dir = prepared
  config.data.hard_negatives_dir = str(tmp_path_factory.mktemp("mined"))
  config.eval.index_size, config.eval.max_pairs = 32, 16
  config.mine.sources = ("model", "bm25")
  config.mine.rank_lo, config.mine.rank_hi, config.mine.per_query = 3, 40, 4
  config.mine.chunk_queries = 64
  return config, prepared, workdir, mine_hard_negatives(config, workdir)


def test_mined_negatives_come_from_the_window_and_are_never_positives(mined):
  config, prepared, workdir, summary = mined
  product = summary["tables"]["q2product"]
  assert product["negatives"] > 0 and set(product["by_source"]) == {"model", "bm25"}
  table = pq.read_table(product["table"]).to_pydict()
  positives = positives_by_query(prepared, "q2product", config)
  towers = TrainedTowers(config, workdir)
  corpus = towers.entities("products")
  model_rows = [i for i, s in enumerate(table["source"]) if s == "model"]
  for i in model_rows[:60]:
    query, entity = table["query_index"][i], table["entity_index"][i]
    assert entity not in positives[query]
    scores = towers.queries(towers.stores["queries"].tokens[[query]]) @ corpus.T
    rank = int(np.flatnonzero(top_ranked(scores, corpus.shape[0])[0] == entity)[0])
    assert 3 <= rank < 40
  per_query = np.unique(np.array(table["query_index"])[model_rows], return_counts=True)[1]
  assert per_query.max() <= 4
  # The pipeline's loader reads it beside any other table of the task.
  hard = HardNegatives.load(prepared, "q2product", towers.stores["queries"].size,
                            towers.stores["products"].size, config.data.hard_negatives_dir)
  assert sum(hard.count(q) for q in range(towers.stores["queries"].size)) > 0


def test_a_killed_mining_job_resumes_from_its_chunks(mined):
  config, prepared, workdir, summary = mined
  first = pq.read_table(summary["tables"]["q2product"]["table"])
  parts = os.path.join(config.data.hard_negatives_dir, ".mining", "q2product")
  chunks = sorted(f for f in os.listdir(parts) if f.startswith("chunk-"))
  assert len(chunks) == summary["tables"]["q2product"]["chunks"] > 1
  os.remove(os.path.join(parts, chunks[-1]))   # killed before its last chunk was written
  again = mine_hard_negatives(config, workdir)["tables"]["q2product"]
  assert again["chunks_resumed"] == len(chunks) - 1
  assert pq.read_table(again["table"]).equals(first)


def test_launch_mine_prints_one_json_line(tiny_bundle, tmp_path):
  _, prepared, workdir, _, _ = tiny_bundle
  result = run_launch("mine", *common_flags(workdir, prepared),
                      f"--config.data.hard_negatives_dir={tmp_path}", "--config.mine.tasks=q2pin")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["mine"]
  assert summary["tables"]["q2pin"]["negatives"] > 0
  assert os.path.exists(tmp_path / "q2pin.mined.parquet")
