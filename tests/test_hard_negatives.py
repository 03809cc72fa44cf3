"""Per-row hard negatives (omnisage/data/omnisearchsage/hard_negatives.py): the table, sampling
against a plain loop, the training input's [B, k] features (feature_pipeline.py), and the step's
loss with them."""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from omnisage.data.omnisearchsage import feature_examples, schema
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.data.omnisearchsage.hard_negatives import HardNegatives, table_dir, write_table
from omnisage.data.omnisearchsage.pipeline import load_stores
from omnisage.data.omnisearchsage.schema import vocab_sizes_of
from omnisage.train import sharding
from omnisage.train.omnisearchsage import step as step_lib
from omnisage.train.omnisearchsage.state import create_train_state


def test_sample_draws_from_the_query_list_without_its_positive():
  table = HardNegatives(np.array([0, 0, 0, 2, 2, 0]), np.array([5, 6, 7, 9, 9, 5]), num_queries=4)
  assert [table.count(q) for q in range(4)] == [3, 0, 1, 0]   # duplicates dropped
  rng = np.random.default_rng(0)
  ids, valid = table.sample(np.array([0, 1, 2, 0]), np.array([6, 3, 9, 1]), k=2, rng=rng)
  assert valid.tolist() == [[True, True], [False, False], [False, False], [True, True]]
  assert set(ids[0]) == {5, 7}                   # its positive 6 is never a negative
  assert set(ids[3]) <= {5, 6, 7} and len(set(ids[3])) == 2
  ids, valid = table.sample(np.array([0]), np.array([1]), k=5, rng=rng)
  assert sorted(ids[0][valid[0]]) == [5, 6, 7] and valid.sum() == 3   # fewer than k: padding


def test_out_of_range_rows_are_a_clear_error(tmp_path):
  write_table(str(tmp_path / "hard_negatives" / "q2pin.parquet"), [0, 3], [1, 99], "mined")
  with pytest.raises(ValueError, match=r"entity_index: 1 values outside \[0, 50\)"):
    HardNegatives.load(str(tmp_path), "q2pin", num_queries=10, num_entities=50)
  assert HardNegatives.load(str(tmp_path), "q2product", 10, 50) is None


@pytest.fixture(scope="module")
def world(tiny_prepared, tmp_path_factory):
  config, source = tiny_prepared
  config = ml_collections.ConfigDict(config.to_dict())
  config.loss.hard_negatives = 2
  # A private copy: the examples built here embed the table below (the shared dir's stay as
  # they are).
  prepared = str(tmp_path_factory.mktemp("hard_world") / "prepared")
  shutil.copytree(source, prepared, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  stores = load_stores(prepared, config.data)
  # A table in its own directory (data.hard_negatives_dir): 3 random products for every query.
  config.data.hard_negatives_dir = str(tmp_path_factory.mktemp("hard"))
  rng = np.random.default_rng(1)
  queries = np.repeat(np.arange(stores["queries"].size), 3)
  write_table(f"{config.data.hard_negatives_dir}/q2product.parquet", queries,
              rng.integers(0, stores["products"].size, len(queries)), "mined")
  feature_examples.ensure_feature_examples(config, prepared)
  return config, prepared, stores


def test_pipeline_adds_hard_negative_features(world):
  config, prepared, stores = world
  batch = next(FeatureTrainData(config, prepared, 0, 1).iterator())
  b = config.tasks.q2product
  hard = batch["q2product"]
  assert hard["hard_ids"].shape == (b, 2)
  # A query's 3 random products hold fewer than 2 others than its positive only when they repeat.
  table = HardNegatives.load(prepared, "q2product", stores["queries"].size,
                             stores["products"].size, config.data.hard_negatives_dir)
  for row, (query, pos) in enumerate(zip(hard["query_ids"], hard["pos_ids"])):
    pool = set(table.entities[table.offsets[query]:table.offsets[query + 1]].tolist()) - {pos}
    assert hard["hard_valid"][row].sum() == min(2, len(pool))
    assert set(hard["hard_ids"][row][hard["hard_valid"][row]].tolist()) <= pool
  assert hard["hard_valid"].mean() > 0.9
  assert hard["hard_tokens"].shape == (b, 2, config.data.max_entity_tokens)
  assert hard["hard_continuous"].shape[:2] == (b, 2)
  valid = hard["hard_valid"]
  np.testing.assert_array_equal(hard["hard_tokens"][valid],
                                stores["products"].tokens[hard["hard_ids"][valid]])
  assert not hard["hard_tokens"][~valid].any()
  # Tasks without a table get all-invalid slots, so every task keeps one batch structure.
  assert not batch["q2pin"]["hard_valid"].any()
  assert table_dir(prepared, config.data.hard_negatives_dir) == config.data.hard_negatives_dir


def test_hard_negatives_enter_the_loss(world):
  config, prepared, stores = world
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  batch = next(FeatureTrainData(config, prepared, 0, 1).iterator())
  model = statics.model(state.params)
  loss = lambda b: step_lib.multitask_loss(model, config.loss, config.model, False, b,
                                           state.freq)[1]["loss/q2product"]
  without = {t: {k: v for k, v in b.items() if not k.startswith("hard")} for t, b in batch.items()}
  masked = {t: dict(b, hard_valid=np.zeros_like(b["hard_valid"])) for t, b in batch.items()}
  with_hard, base = float(loss(batch)), float(loss(without))
  assert with_hard > base                        # more negatives in every row's softmax
  assert float(loss(masked)) == pytest.approx(base, rel=1e-6)   # padding slots change nothing
  assert schema.TASK_ENTITY["q2product"] == "products"


def test_prepare_turns_judged_negatives_into_tables(tiny_prepared, tmp_path):
  """The optional raw table judged_negatives -> <prepared>/hard_negatives/<task>.judged.parquet;
  rows that could never be used are bad rows counted by reason."""
  import shutil

  import pyarrow as pa
  import pyarrow.parquet as pq

  from omnisage.data.omnisearchsage.prepare import prepare
  config, prepared = tiny_prepared
  raw = os.path.join(os.path.dirname(prepared), "raw")
  own_raw = str(tmp_path / "raw")
  shutil.copytree(raw, own_raw)
  queries = pq.read_table(os.path.join(prepared, "entities", "queries.parquet"))
  products = pq.read_table(os.path.join(prepared, "entities", "products.parquet"))
  train_query = first_train_query(prepared, "q2product")
  text = queries.column("text")[train_query].as_py()
  product_ids = products.column("id").to_pylist()
  negatives = {"query": [text, text, text, "never searched", text],
               "entity_kind": ["products", "products", "pins", "products", "boards"],
               "entity_id": [product_ids[3], product_ids[7], "no-such-pin", product_ids[1], "x"]}
  pq.write_table(pa.table(negatives), os.path.join(own_raw, "judged_negatives.parquet"))
  summary = prepare(config, own_raw, str(tmp_path / "prepared"))
  assert summary["judged_negatives"] == {"q2product": 2}
  assert summary["bad_rows"]["judged_negatives"] == {"unknown_query": 1, "unknown_entity": 1,
                                                     "invalid_value": 1}
  table = pq.read_table(str(tmp_path / "prepared" / "hard_negatives" /
                            "q2product.judged.parquet")).to_pydict()
  assert table["query_index"] == [train_query, train_query]
  assert table["entity_index"] == [3, 7] and table["source"] == ["judged", "judged"]


def first_train_query(prepared: str, task: str) -> int:
  from omnisage.data.omnisearchsage.pipeline import read_pairs
  pairs = read_pairs(prepared, "train", task, 10, 0, 8)
  return int(pairs["query_ids"][0])
