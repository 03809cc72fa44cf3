"""`launch.py prepare` on Ray Data (issue 19), stage by stage, against today's prepare.

1. Today's prepare (tests/conftest.py `tiny_prepared`) still writes exactly the frozen digest of
   tests/fixtures/prepare_tiny_digest.json (tests/prepare_digest.py): it guards the replacement.
2. Each finished stage of omnisage/data/omnisearchsage/ray_prepare.py, run on the two-node
   `ray_cluster` over the same raw world rewritten with small Parquet row groups (so several
   blocks, and bad rows and duplicates spread over them), gives today's values.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.data.omnisearchsage import schema
from tests.prepare_digest import digest_diff, load_fixture, prepared_digest

ROW_GROUP = 1000   # raw rows per block: 1 to 11 blocks per table of the tiny world


def test_todays_prepare_matches_the_frozen_digest(tiny_prepared):
  _, prepared = tiny_prepared
  assert digest_diff(prepared_digest(prepared), load_fixture()) == []


@pytest.fixture(scope="module", autouse=True)
def small_shuffle():
  """The sort shuffle for this module's tiny group-bys (ray_prepare.SMALL_SHUFFLE)."""
  from omnisage.data.omnisearchsage import ray_prepare
  with ray_prepare.data_context(ray_prepare.SMALL_SHUFFLE):
    yield


@pytest.fixture(scope="module")
def world(tiny_prepared, tmp_path_factory):
  """(config, raw dir in small row groups, today's prepared dir, today's meta.json)."""
  config, prepared = tiny_prepared
  raw = os.path.join(os.path.dirname(prepared), "raw")
  blocks = str(tmp_path_factory.mktemp("raw_blocks"))
  for name in schema.RAW_TABLES:
    table = pq.read_table(os.path.join(raw, f"{name}.parquet"))
    if name == "pins":   # a duplicate id in a later block than the first (valid) row of that id
      dup = table.slice(3, 1)
      table = pa.concat_tables([table, dup])
    pq.write_table(table, os.path.join(blocks, f"{name}.parquet"), row_group_size=ROW_GROUP // (
        4 if name in ("pins", "products") else 1))
  with open(os.path.join(prepared, "meta.json")) as f:
    meta = json.load(f)
  return config, blocks, prepared, meta


@pytest.fixture(scope="module")
def entities(ray_cluster, world):
  from omnisage.data.omnisearchsage import ray_prepare
  config, raw, _, _ = world
  return ray_prepare.validate_entities(config, raw)


@pytest.fixture(scope="module")
def logs(ray_cluster, world, entities):
  from omnisage.data.omnisearchsage import ray_prepare
  config, raw, _, _ = world
  return ray_prepare.validate_logs(config, raw, entities)


def today_table(prepared, kind) -> pa.Table:
  return pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet"))


def test_entity_validation_counts_bad_rows_over_blocks(world, entities):
  _, raw, prepared, meta = world
  for kind, stage in entities.items():
    want = dict(meta["bad_rows"][kind])
    if kind == "pins":   # the appended copy of pin row 3 (a valid row) in the last block
      want["duplicate_id"] = 1
    assert stage.bad == want, kind
    assert stage.raw_rows == pq.read_metadata(os.path.join(raw, f"{kind}.parquet")).num_rows
    assert len(stage.examples) == min(5, sum(want.values()))
    today = today_table(prepared, kind)
    assert list(stage.index) == today["id"].to_pylist()
    assert list(stage.index.values()) == list(range(today.num_rows))
    got = stage.dataset.to_arrow_refs()
    import ray
    got = pa.concat_tables(ray.get(got))
    got = got.take(pa.compute.sort_indices(got["entity_index"]))
    for col in ("entity_index", "id", "title", "legacy", "visual"):
      assert got[col].to_pylist() == today[col].to_pylist(), (kind, col)


def test_log_validation_and_time_split(world, logs):
  _, _, _, meta = world
  assert logs.bad == {k: meta["bad_rows"][k] for k in ("queries_log", "board_saves")}
  assert logs.split == meta["split"]
  assert logs.raw_rows == {k: meta["raw_rows"][k] for k in ("queries_log", "board_saves")}


@pytest.fixture(scope="module")
def feats(world, entities, logs):
  """(board titles, engaged queries, uncertain keys, n-gram vocabulary) of the Ray stages."""
  from omnisage.data.omnisearchsage import ray_prepare
  d = world[0].data
  boards = ray_prepare.board_titles(logs.saves, d.board_titles_top)
  engaged, uncertain = ray_prepare.engaged_queries(logs.log, d.engaged_queries_top,
                                                   d.engaged_refresh_days)
  datasets = {k: e.dataset for k, e in entities.items()}
  return boards, engaged, uncertain, ray_prepare.ngram_vocab(datasets, boards, engaged, d)


def test_features_vocab_and_entity_tables(world, entities, feats, tmp_path):
  from omnisage.data import text
  from omnisage.data.omnisearchsage import ray_prepare
  config, _, prepared, meta = world
  d = config.data
  boards, engaged, uncertain, vocab = feats
  f = meta["features"]
  assert len(boards) == f["pins_with_board_titles"]
  assert {k: len({e for e, _ in v}) for k, v in engaged.items()} == (
      f["entities_with_engaged_queries"])
  assert {k: len(v) for k, v in uncertain.items()} == f["engaged_lists_not_certified_exact"]

  datasets = {k: e.dataset for k, e in entities.items()}
  today = text.NgramVocab.load(os.path.join(prepared, "ngram_vocab"))
  assert (vocab.trigrams, vocab.unigrams, vocab.bigrams) == (
      today.trigrams, today.unigrams, today.bigrams)

  tables = ray_prepare.encode_entity_tables(datasets, boards, engaged, vocab, d)
  dirs = ray_prepare.write_entity_tables(tables, str(tmp_path))
  for kind, directory in dirs.items():
    got, want = ray_prepare.read_entity_table(directory), today_table(prepared, kind)
    assert got.column_names == want.column_names
    for col in want.column_names:
      assert got[col].type == want[col].type, (kind, col)
      assert got[col].to_pylist() == want[col].to_pylist(), (kind, col)


def test_query_table_and_pairs(world, logs, feats, tmp_path):
  from omnisage.data.omnisearchsage import ray_prepare
  from tests.prepare_digest import pairs_digest, sha256_file, sha256_json
  config, _, prepared, meta = world
  fixture = load_fixture()
  texts = ray_prepare.query_texts(logs.log)
  assert texts == today_table(prepared, "queries")["text"].to_pylist()
  vocab_path = ray_prepare.query_vocab(config, logs.log, str(tmp_path))
  assert sha256_file(vocab_path) == fixture["files"]["query_vocab.txt"]

  written = ray_prepare.write_entity_tables(
      {"queries": ray_prepare.query_table(texts, vocab_path, feats[3], config.data)},
      str(tmp_path))
  table = ray_prepare.read_entity_table(written["queries"])
  want = fixture["entities"]["queries"]
  assert table.num_rows == want["rows"]
  for col in table.column_names:
    assert {"type": str(table[col].type), "sha256": sha256_json(table[col].to_pylist())} == (
        want[col]), col

  q_index = {q: i for i, q in enumerate(texts)}
  q_tokens = [np.asarray(t, np.int32) for t in table["tokens"].to_pylist()]
  pairs, dropped = ray_prepare.write_pairs(config, logs.log, q_index, q_tokens, str(tmp_path))
  assert pairs == meta["pairs"] and dropped == meta["dropped_pairs"]
  for key, digest in fixture["pairs"].items():
    assert pairs_digest(os.path.join(tmp_path, key)) == digest, key


def test_prepare_on_ray_writes_the_frozen_digest(ray_cluster, tiny_prepared, tmp_path):
  """All stages together, on today's raw world (one row group per table), equal today's digest."""
  from omnisage.data.omnisearchsage import ray_prepare
  config, prepared = tiny_prepared
  raw = os.path.join(os.path.dirname(prepared), "raw")
  ray_prepare.prepare_on_ray(config, raw, str(tmp_path / "out"))
  assert digest_diff(prepared_digest(str(tmp_path / "out")), load_fixture()) == []
