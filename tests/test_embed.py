"""`launch.py embed`, the daily batch inference of SPEC §1 "Serving": a trained, exported bundle
embeds a prepared entity table into Parquet shards that match the bundle's own embeddings, and a
re-run recomputes only the shards that are missing."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import TINY_CONFIG, last_json
from tests.helpers import run_launch as launch

ROW_GROUP = 100   # several input row groups, so several output shards
BATCH = 64        # smaller than a row group: several (padded) tower calls per shard


@pytest.fixture(scope="module")
def bundle_and_pins(tiny_bundle, tmp_path_factory):
  """(prepared dir, bundle dir, pins table rewritten with small row groups)."""
  _, prepared, _, bundle, _ = tiny_bundle
  pins = str(tmp_path_factory.mktemp("embed_input") / "pins.parquet")  # name tells the kind
  table = pq.read_table(os.path.join(prepared, "entities", "pins.parquet"))
  pq.write_table(table, pins, row_group_size=ROW_GROUP)
  return prepared, bundle, pins


def read_shards(kind_dir) -> dict:
  return {name: pq.read_table(os.path.join(kind_dir, name))
          for name in sorted(os.listdir(kind_dir))}


def test_embeddings_match_the_bundle_and_reruns_only_redo_missing_shards(bundle_and_pins,
                                                                          tmp_path):
  from omnisage.data.omnisearchsage.entity_store import EntityStore
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.index.embed import embed_entities
  prepared, bundle_dir, pins = bundle_and_pins
  table = pq.read_table(pins)
  groups = pq.ParquetFile(pins).num_row_groups
  assert groups >= 3

  out = str(tmp_path / "embeddings")
  first = embed_entities(bundle_dir, pins, out, batch_size=BATCH)
  assert first["kind"] == "pins" and first["rows"] == table.num_rows
  assert first["shards_written"] == groups and first["shards_skipped"] == 0
  kind_dir = os.path.join(out, "pins")
  shards = read_shards(kind_dir)
  assert list(shards) == [f"shard-{i:05d}.parquet" for i in range(groups)]   # no temp files left

  got = pa.concat_tables(shards.values())
  assert got.num_rows == table.num_rows
  assert got.schema.field("entity_index").type == "int32"
  assert str(got.schema.field("embedding").type) == "fixed_size_list<element: float>[256]"
  np.testing.assert_array_equal(got.column("entity_index").to_numpy(),
                                table.column("entity_index").to_numpy())
  assert got.column("id").to_pylist() == table.column("id").to_pylist()
  assert got.column("title").to_pylist() == table.column("title").to_pylist()

  # The same rows through the bundle directly, with the inputs training builds (EntityStore).
  bundle = load_bundle(bundle_dir)
  store = EntityStore.load(prepared, "pins", max_tokens=bundle.dims["entity_tokens"])
  idx = np.arange(store.size)
  want = bundle.embed_entities(store.tokens, store.fields.astype(np.int32), store.continuous(idx))
  vectors = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
  assert vectors.dtype == np.float32
  np.testing.assert_allclose(vectors, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

  # A second run finds every shard complete and touches none of them.
  mtimes = {name: os.stat(os.path.join(kind_dir, name)).st_mtime_ns for name in shards}
  second = embed_entities(bundle_dir, pins, out, batch_size=BATCH)
  assert second["shards_skipped"] == groups and second["shards_written"] == 0
  assert second["rows_embedded"] == 0
  assert {n: os.stat(os.path.join(kind_dir, n)).st_mtime_ns for n in shards} == mtimes
  assert all(t.equals(shards[n]) for n, t in read_shards(kind_dir).items())

  # A lost shard (a pre-empted host) is the only one recomputed, and comes back identical.
  lost = "shard-00001.parquet"
  os.remove(os.path.join(kind_dir, lost))
  third = embed_entities(bundle_dir, pins, out, batch_size=BATCH)
  assert third["shards_written"] == 1 and third["shards_skipped"] == groups - 1
  assert third["rows_embedded"] == ROW_GROUP
  after = read_shards(kind_dir)
  assert {n: os.stat(os.path.join(kind_dir, n)).st_mtime_ns
          for n in after if n != lost} == {n: t for n, t in mtimes.items() if n != lost}
  assert all(t.equals(shards[n]) for n, t in after.items())


def test_launch_embed_writes_shards_and_one_json_line(bundle_and_pins, tmp_path):
  _, bundle_dir, pins = bundle_and_pins
  out = tmp_path / "embeddings"
  # No --config / --workdir: the bundle carries everything embed needs.
  result = launch("embed", f"--bundle={bundle_dir}", f"--entities={pins}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["embed"]
  assert summary["kind"] == "pins" and summary["shards_written"] == summary["shards"]
  assert summary["rows"] == pq.read_metadata(pins).num_rows
  assert len(os.listdir(out / "pins")) == summary["shards"]


def test_launch_embed_with_a_missing_table_is_a_clear_error(bundle_and_pins, tmp_path):
  _, bundle_dir, _ = bundle_and_pins
  result = launch("embed", f"--config={TINY_CONFIG}:tiny",
                  f"--workdir={tmp_path}", f"--bundle={bundle_dir}",
                  f"--entities={tmp_path / 'pins.parquet'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  assert "not found" in result.stderr and "Traceback" not in result.stderr
  assert "error" in last_json(result)["embed"]


def test_queries_are_embedded_with_the_query_tower(bundle_and_pins, tmp_path):
  from omnisage.data.omnisearchsage.entity_store import EntityStore
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.index.embed import embed_entities
  prepared, bundle_dir, _ = bundle_and_pins
  summary = embed_entities(bundle_dir, os.path.join(prepared, "entities", "queries.parquet"),
                           str(tmp_path), batch_size=BATCH)
  got = pq.read_table(os.path.join(tmp_path, "queries"))
  assert summary["kind"] == "queries" and got.num_rows == summary["rows"]
  assert "id" not in got.column_names   # the queries table has no raw id column
  texts = pq.read_table(os.path.join(prepared, "entities", "queries.parquet"), columns=["text"])
  assert sorted(got.column("title").to_pylist()) == sorted(texts.column("text").to_pylist())
  bundle = load_bundle(bundle_dir)
  store = EntityStore.load(prepared, "queries", max_tokens=bundle.dims["query_len"])
  order = got.column("entity_index").to_numpy()
  np.testing.assert_allclose(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                             bundle.embed_queries(store.tokens[order]), atol=1e-5, rtol=0)
