"""Hard-negative mining (omnisage/train/omnisearchsage/mine.py): the rank window against a plain
loop, the mined table against the checkpoint's own ranking, the training examples rebuilt with
it, resume after a kill, launch.py mine."""

import os
import shutil

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from omnisage.data.omnisearchsage import feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
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


def private_prepared(source: str, root) -> str:
  """A copy of the shared prepared dir without feature examples: mining rebuilds them, with a
  table of its own, and the shared ones stay as training built them."""
  prepared = str(root / "prepared")
  shutil.copytree(source, prepared, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  return prepared


@pytest.fixture(scope="module")
def mined(tiny_bundle, tmp_path_factory):
  config, source, workdir, _, _ = tiny_bundle
  prepared = private_prepared(source, tmp_path_factory.mktemp("mine_world"))
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


def test_mining_rebuilds_the_training_examples_with_the_mined_table(mined):
  """The examples embed each query's hard negatives: after `mine` they are current and hold
  exactly the mined table's negatives (minus the positive), so `train` reads them as they are."""
  config, prepared, _, summary = mined
  assert feature_examples.is_current(config, prepared)
  meta = feature_examples.read_meta(prepared)
  assert summary["feature_examples"]["examples"] == sum(meta["pairs"].values()) > 0
  assert summary["feature_examples"]["pairs"] == meta["pairs"]
  assert set(meta["hard_negatives"]) == set(summary["tables"]) == {"q2pin", "q2product"}
  for task, info in summary["tables"].items():
    table = pq.read_table(info["table"]).to_pydict()
    pools = {}
    for query, entity in zip(table["query_index"], table["entity_index"]):
      pools.setdefault(query, set()).add(entity)
    directory = os.path.join(feature_examples.directory_of(prepared), "train", task)
    checked = 0
    for name in sorted(os.listdir(directory)):
      reader = ArrayRecordReader(os.path.join(directory, name))
      for record in reader.read(0, min(reader.num_records(), 200)):
        example = feature_examples.decode_arrays(record)
        query, pos = int(example["query_ids"][0]), int(example["pos_ids"][0])
        want = pools.get(query, set()) - {pos}
        assert set(example.get("hard_ids", np.zeros(0)).tolist()) == want, (task, query)
        checked += bool(want)
      reader.close()
    assert checked > 0, task
  # And the training input serves them: a batch's hard negatives come from the mined table.
  config = ml_collections.ConfigDict(config.to_dict())
  config.loss.hard_negatives = 2
  batch = next(FeatureTrainData(config, prepared, 0, 1).iterator())["q2product"]
  assert batch["hard_valid"].any()


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
  _, source, workdir, _, _ = tiny_bundle
  prepared = private_prepared(source, tmp_path / "world")
  result = run_launch("mine", *common_flags(workdir, prepared),
                      f"--config.data.hard_negatives_dir={tmp_path}", "--config.mine.tasks=q2pin")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["mine"]
  assert summary["tables"]["q2pin"]["negatives"] > 0
  assert os.path.exists(tmp_path / "q2pin.mined.parquet")
  assert summary["feature_examples"]["hard_negatives"] == ["q2pin"]
  assert summary["feature_examples"]["examples"] > 0
