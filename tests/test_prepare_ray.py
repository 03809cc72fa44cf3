"""`launch.py prepare` on Ray Data, held to the output of the in-memory prepare it replaced.

1. prepare (tests/conftest.py `tiny_prepared`, on the two-node `ray_cluster`) writes exactly the
   frozen digest of tests/fixtures/prepare_tiny_digest.json (tests/prepare_digest.py), made by
   the in-memory prepare before Ray Data replaced it.
2. Each stage (omnisage/data/omnisearchsage/ray_*.py), over the same raw world rewritten with
   small Parquet row groups (so several blocks, and bad rows and duplicates spread over them),
   gives the values of the whole run.
3. A Home Depot-style world (no pins, explicit split, judged negatives with bad rows) gives its
   frozen digest; inputs that cannot make a training set give the frozen errors (type and
   message, tests/fixtures/prepare_refusals.json).
4. The engaged-query lists computed for all keys at once (ray_features) against a key-by-key
   reference, and `launch.py prepare --config.data.ray_address=<cluster>`.
"""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.data.omnisearchsage import schema
from tests.prepare_digest import digest_diff, load_fixture, prepared_digest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HOMEDEPOT_DIGEST = os.path.join(FIXTURES, "prepare_homedepot_digest.json")
REFUSALS = os.path.join(FIXTURES, "prepare_refusals.json")

ROW_GROUP = 1000   # raw rows per block: 1 to 11 blocks per table of the tiny world


def test_prepare_writes_the_frozen_digest(tiny_prepared):
  _, prepared = tiny_prepared
  assert digest_diff(prepared_digest(prepared), load_fixture()) == []


@pytest.fixture(scope="module", autouse=True)
def small_shuffle():
  """The sort shuffle for this module's tiny group-bys (ray_blocks.SMALL_SHUFFLE)."""
  from omnisage.data.omnisearchsage import ray_blocks
  with ray_blocks.data_context(ray_blocks.SMALL_SHUFFLE):
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
  from omnisage.data.omnisearchsage import ray_validate
  config, raw, _, _ = world
  return ray_validate.validate_entities(config, raw)


@pytest.fixture(scope="module")
def logs(ray_cluster, world, entities):
  from omnisage.data.omnisearchsage import ray_validate
  config, raw, _, _ = world
  return ray_validate.validate_logs(config, raw, entities)


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
    assert stage.index.ids.to_pylist() == today["id"].to_pylist()   # id i -> entity_index i
    np.testing.assert_array_equal(stage.index.lookup(today["id"]), np.arange(today.num_rows))
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


def test_block_units_bound_a_block_by_rows_and_bytes():
  from omnisage.data.omnisearchsage.ray_blocks import block_units
  # Fewer row groups than CPUs: slices of at least min_rows; a big row group: max_rows slices.
  assert [u["rows"] for u in block_units([100], 4, min_rows=20)] == [25] * 4
  assert [u["rows"] for u in block_units([100], 4, min_rows=50)] == [50] * 2
  units = block_units([1000, 10], 1, min_rows=1, max_rows=300)
  assert [(u["group"], u["offset"], u["rows"], u["start"]) for u in units] == [
      (0, 0, 250, 0), (0, 250, 250, 250), (0, 500, 250, 500), (0, 750, 250, 750), (1, 0, 10, 1000)]
  # 1000 rows of 10 bytes each, at most 2,500 bytes a block: 4 slices.
  assert [u["rows"] for u in block_units([1000], 1, min_rows=1, sizes=[10_000],
                                         max_bytes=2500)] == [250] * 4
  assert block_units([], 2) == [{"group": -1, "offset": 0, "rows": 0, "start": 0}]


def test_read_slice_streams_part_of_a_row_group(tmp_path):
  from omnisage.data.omnisearchsage.ray_blocks import read_slice
  table = pa.table(dict(x=np.arange(250_000), s=[f"q{i % 977}" for i in range(250_000)]))
  path = str(tmp_path / "t.parquet")
  pq.write_table(table, path, row_group_size=200_000)
  for group, offset, rows in ((0, 0, 200_000), (0, 65_530, 70_001), (0, 199_999, 1),
                              (1, 10, 40_000), (0, 0, 0)):
    start = 200_000 * group + offset
    assert read_slice(path, group, offset, rows).equals(table.slice(start, rows)), (offset, rows)
  assert read_slice(path, -1, 0, 0).num_rows == 0


def test_slices_of_one_row_group_validate_as_the_whole_table(ray_cluster, tiny_prepared,
                                                             monkeypatch):
  """Validation over a one-row-group raw world cut into many blocks (MAX_BLOCK_ROWS small)."""
  from omnisage.data.omnisearchsage import ray_blocks, ray_validate
  config, prepared = tiny_prepared
  raw = os.path.join(os.path.dirname(prepared), "raw")
  with open(os.path.join(prepared, "meta.json")) as f:
    meta = json.load(f)
  monkeypatch.setattr(ray_blocks, "MAX_BLOCK_ROWS", 700)
  assert len(ray_blocks.block_units([pq.read_metadata(os.path.join(raw, "queries_log.parquet"))
                                     .num_rows], 2, max_rows=700)) > 3
  entities = ray_validate.validate_entities(config, raw)
  for kind, stage in entities.items():
    assert stage.bad == meta["bad_rows"][kind]
    assert stage.index.ids.to_pylist() == today_table(prepared, kind)["id"].to_pylist()
  logs = ray_validate.validate_logs(config, raw, entities)
  assert logs.bad == {k: meta["bad_rows"][k] for k in ("queries_log", "board_saves")}
  assert logs.split == meta["split"]


@pytest.fixture(scope="module")
def feats(world, entities, logs, tmp_path_factory):
  """(the feature lists on disk, n-gram vocabulary) of the Ray stages."""
  from omnisage.data.omnisearchsage import ray_features
  d = world[0].data
  lists = ray_features.feature_lists(logs, d, str(tmp_path_factory.mktemp("feature_lists")))
  datasets = {k: e.dataset for k, e in entities.items()}
  return lists, ray_features.ngram_vocab(datasets, lists, d)


def test_features_vocab_and_entity_tables(world, entities, feats, tmp_path):
  from omnisage.data import text
  from omnisage.data.omnisearchsage import ray_blocks, ray_features
  config, _, prepared, meta = world
  d = config.data
  lists, vocab = feats
  boards, engaged, uncertain = lists.as_dicts()
  f = meta["features"]
  assert len(boards) == f["pins_with_board_titles"]
  assert {k: len({e for e, _ in v}) for k, v in engaged.items()} == (
      f["entities_with_engaged_queries"])
  assert {k: len(v) for k, v in uncertain.items()} == f["engaged_lists_not_certified_exact"]
  assert lists.summary() == {k: f[k] for k in lists.summary()}
  # Each file is sorted by entity, and a block's lookup is the dicts' rows of its entities.
  assert pq.read_table(lists.boards)["pin"].to_pylist() == sorted(boards)
  for kind, path in lists.engaged.items():
    column = pq.read_table(path)["entity"].to_numpy()
    assert (np.diff(column) >= 0).all() and len(column) == len(engaged[kind])
  some = np.array([7, 3, 120, 5, 64], np.int64)
  got_boards, got_engaged = lists.for_block("pins", some)
  assert got_boards == {i: boards[e] for i, e in enumerate(some.tolist()) if e in boards}
  assert got_engaged == {(i, g): v for i, e in enumerate(some.tolist())
                         for (e2, g), v in engaged["pins"].items() if e2 == e}
  assert lists.for_block("products", np.array([], np.int64)) == ({}, {})

  datasets = {k: e.dataset for k, e in entities.items()}
  today = text.NgramVocab.load(os.path.join(prepared, "ngram_vocab"))
  assert (vocab.trigrams, vocab.unigrams, vocab.bigrams) == (
      today.trigrams, today.unigrams, today.bigrams)

  tables = ray_features.encode_entity_tables(datasets, lists, vocab, d)
  for kind, ds in tables.items():   # several blocks each, in any order: the sink orders them
    path = os.path.join(tmp_path, f"{kind}.parquet")
    ray_blocks.write_table_file(ds, path)
    got, want = pq.read_table(path), today_table(prepared, kind)
    assert got.column_names == want.column_names
    for col in want.column_names:
      assert got[col].type == want[col].type, (kind, col)
      assert got[col].to_pylist() == want[col].to_pylist(), (kind, col)


def test_table_file_sink_orders_blocks_and_writes_empty_tables(ray_cluster, tmp_path):
  """write_table_file: blocks in any order (and, though the entity tables never have them,
  overlapping entity_index ranges) give one file in entity_index order; no row: `empty`."""
  import ray

  from omnisage.data.omnisearchsage import ray_blocks
  def block(index):
    return pa.table(dict(entity_index=pa.array(index, pa.int32()),
                         id=pa.array([f"e{i}" for i in index])))
  ds = ray.data.from_arrow([block([4, 5]), block([0, 1, 2]), block([3, 9]), block([6, 7, 8])])
  ray_blocks.write_table_file(ds, str(tmp_path / "ranges.parquet"))
  assert pq.read_table(tmp_path / "ranges.parquet") == block(list(range(10)))
  ds = ray.data.from_arrow([block([5, 1]), block([0, 3])])
  ray_blocks.write_table_file(ds, str(tmp_path / "overlap.parquet"))
  assert pq.read_table(tmp_path / "overlap.parquet") == block([0, 1, 3, 5])
  empty = block([])
  ray_blocks.write_table_file(ds.filter(lambda r: False), str(tmp_path / "empty.parquet"), empty)
  assert pq.read_table(tmp_path / "empty.parquet") == empty


def test_query_table_and_pairs(world, logs, feats, tmp_path):
  from omnisage.data.omnisearchsage import ray_blocks, ray_pairs
  from tests.prepare_digest import pairs_digest, sha256_file, sha256_json
  config, _, prepared, meta = world
  fixture = load_fixture()
  texts = ray_pairs.query_texts(logs.log)
  assert texts == today_table(prepared, "queries")["text"].to_pylist()
  vocab_path = ray_pairs.query_vocab(config, logs.log, str(tmp_path))
  assert sha256_file(vocab_path) == fixture["files"]["query_vocab.txt"]

  path = os.path.join(tmp_path, "entities", "queries.parquet")
  ray_blocks.write_table_file(ray_pairs.query_table(texts, vocab_path, feats[1], config.data),
                              path)
  table = pq.read_table(path)
  want = fixture["entities"]["queries"]
  assert table.num_rows == want["rows"]
  for col in table.column_names:
    assert {"type": str(table[col].type), "sha256": sha256_json(table[col].to_pylist())} == (
        want[col]), col
  # On the driver, a few queries at a time (prepare's path below DRIVER_QUERY_TOKENS): the same.
  on_driver = ray_pairs.query_tokens(texts, vocab_path, config.data, batch_size=7,
                                     on_driver=True).to_arrow_refs()
  import ray
  on_driver = pa.concat_tables(ray.get(on_driver))
  assert on_driver["entity_index"].to_pylist() == list(range(len(texts)))
  assert on_driver["tokens"].to_pylist() == table["tokens"].to_pylist()

  pairs, dropped = ray_pairs.write_pairs(config, logs.log, texts, table["tokens"], str(tmp_path))
  assert pairs == meta["pairs"] and dropped == meta["dropped_pairs"]
  for key, digest in fixture["pairs"].items():
    assert pairs_digest(os.path.join(tmp_path, key)) == digest, key


def test_prepare_summary_has_the_stage_seconds(tiny_prepared):
  """meta.json's per-stage `seconds` (docs/scale_out.md reads them)."""
  _, prepared = tiny_prepared
  with open(os.path.join(prepared, "meta.json")) as f:
    seconds = json.load(f)["seconds"]
  assert set(seconds) == {"validate", "query_vocab", "features", "entities", "pairs", "examples"}
  assert all(v >= 0 for v in seconds.values())


# --- 3. the whole of prepare on other worlds, and what it refuses ---------------------------------
@pytest.fixture(scope="module")
def homedepot_world(tmp_path_factory):
  return make_homedepot_world(tmp_path_factory.mktemp("homedepot"))


def make_homedepot_world(root):
  """(config, raw dir) of a Home Depot-style world made by omnisage.data.sources.homedepot: no
  pins, no board saves, an explicit split, judged negatives (relevance < 2) of training queries
  plus one judged row per bad-row reason prepare counts; small row groups (several blocks)."""
  import gzip

  from configs import omnisage_homedepot
  from omnisage.data.sources import homedepot
  lines = ['"id","product_uid","product_title","search_term","relevance"']
  for j in range(40):   # neighbours share a positive; two judged-irrelevant products each
    for n, (uid, rel) in enumerate(((f"p{j}", 3), (f"p{j + 1}", 2.67), (f"neg{j}", 1.33),
                                    (f"neg{j + 7}", 1))):
      lines.append(f'{4 * j + n + 1},{uid},"{uid} cordless widget {j % 5}",query {j} drill,{rel}')
  with gzip.open(root / "train.csv.gz", "wt", encoding="latin-1") as f:
    f.write("\n".join(lines) + "\n")
  hd = homedepot.load(str(root / "train.csv.gz"))
  legacy = np.random.default_rng(0).standard_normal((hd.products.num_rows, 256)).astype(
      np.float32)
  raw = root / "raw"
  homedepot.to_raw_tables(hd, str(raw), itemsage=legacy)
  judged = pq.read_table(raw / "judged_negatives.parquet").to_pydict()
  q, kind, eid = judged["query"][0], judged["entity_kind"][0], judged["entity_id"][0]
  for row in ((q, "products", "no-such-product"),          # unknown_entity
              (q, "pins", "a-pin"),                        # unknown_entity: there are no pins
              ("never searched", kind, eid),               # unknown_query
              (q, "boards", eid),                          # invalid_value
              (None, kind, eid)):                          # missing_field
    for col, value in zip(("query", "entity_kind", "entity_id"), row):
      judged[col].insert(3, value)
  pq.write_table(pa.table(judged), raw / "judged_negatives.parquet")
  for name, size in (("products", 50), ("queries_log", 40), ("judged_negatives", 20)):
    pq.write_table(pq.read_table(raw / f"{name}.parquet"), raw / f"{name}.parquet",
                   row_group_size=size)
  config = omnisage_homedepot.get_config("tiny")
  config.data.engaged_queries_top = 20   # on: engaged queries under an explicit split
  return config, str(raw)


def test_prepare_writes_the_frozen_digest_of_a_home_depot_world(homedepot_world, tmp_path):
  """The directory prepare wrote for this world before Ray Data replaced its in-memory path
  (tests/fixtures/prepare_homedepot_digest.json); a judged table of an earlier run (q2pin,
  which this world has none for) is removed."""
  from omnisage.data.omnisearchsage import prepare
  config, raw = homedepot_world
  stale = tmp_path / "out" / "hard_negatives" / "q2pin.judged.parquet"
  os.makedirs(stale.parent)
  pq.write_table(pa.table(dict(query_index=[0], entity_index=[0], source=["judged"])), stale)
  summary = prepare.prepare(config, raw, str(tmp_path / "out"))
  assert not stale.exists()
  assert summary["judged_negatives"]["q2product"] > 0 and summary["entities"]["pins"] == 0
  assert summary["split"]["kind"] == "column"
  assert set(summary["bad_rows"]["judged_negatives"]) == {
      "missing_field", "invalid_value", "unknown_query", "unknown_entity"}
  got = prepared_digest(str(tmp_path / "out"))
  assert "q2product.judged.parquet" in got["hard_negatives"]
  with open(HOMEDEPOT_DIGEST) as f:
    want = json.load(f)
  # The config's WordPiece vocabulary file, in this checkout's venv.
  want["meta"]["query_vocab_source"] = want["meta"]["query_vocab_source"].replace(
      "{prefix}", sys.prefix)
  assert digest_diff(got, want) == []


def test_engaged_queries_off(homedepot_world, tmp_path):
  """engaged_queries_top = 0 (Home Depot's default): no engaged-query field in any entity."""
  from omnisage.data.omnisearchsage import prepare
  config, raw = homedepot_world
  config = config.copy_and_resolve_references()
  config.data.engaged_queries_top = 0
  summary = prepare.prepare(config, raw, str(tmp_path / "out"))
  assert summary["features"]["entities_with_engaged_queries"] == {"pins": 0, "products": 0}
  fields = pq.read_table(tmp_path / "out" / "entities" / "products.parquet")["fields"]
  engaged = {i for i, name in enumerate(schema.FIELDS) if name.startswith("engaged_queries_")}
  assert not engaged & set(pa.compute.list_flatten(fields).to_pylist())
  assert summary["pairs"]["train"]["q2product"] > 0


def _empty(raw, name):
  pq.write_table(pq.read_table(raw / f"{name}.parquet").slice(0, 0), raw / f"{name}.parquet")


def _column(raw, name, column, change):
  table = pq.read_table(raw / f"{name}.parquet")
  values = change(table)
  pq.write_table(table.set_column(table.column_names.index(column), column, values),
                 raw / f"{name}.parquet", row_group_size=250)


def _unknown_pins(table):
  kind = np.asarray(table["entity_kind"].to_pylist(), object)
  ids = np.asarray(table["entity_id"].to_pylist(), object)
  ids[kind == "pins"] = "pin_nobody_knows"
  return pa.array(ids, pa.string())


def _not_utf8_at(row):
  def change(table):
    values = [v.encode() if isinstance(v, str) else v for v in table["title"].to_pylist()]
    values[row] = b"\xff\xfe broken"
    return pa.array(values, pa.binary()).view(pa.string())
  return change


# Raw worlds prepare refuses (tests/test_prepare_faults.py), each made from the tiny world.
REFUSED = {
    "empty log": lambda raw: _empty(raw, "queries_log"),
    "empty pins, q2pin needs them": lambda raw: _empty(raw, "pins"),
    "every pin bad": lambda raw: _column(raw, "pins", "id",
                                         lambda t: pa.nulls(t.num_rows, pa.string())),
    "every log row bad": lambda raw: _column(raw, "queries_log", "entity_kind",
                                             lambda t: pa.array(["boards"] * t.num_rows)),
    "no training row engages pins": lambda raw: _column(raw, "queries_log", "entity_id",
                                                        _unknown_pins),
    # in the third row group of 250 rows: the message names the row counted from the file start
    "invalid UTF-8 in a later block": lambda raw: _column(raw, "pins", "title", _not_utf8_at(617)),
    "missing table": lambda raw: os.remove(raw / "board_saves.parquet"),
}


def refusal(case: str, raw) -> tuple[str, str]:
  """(exception type, message) prepare gave for `case` before Ray Data replaced its in-memory
  path (tests/fixtures/prepare_refusals.json), for the raw dir `raw`."""
  with open(REFUSALS) as f:
    kind, message = json.load(f)[case]
  return kind, message.replace("{raw}", str(raw))


@pytest.mark.parametrize("case", list(REFUSED))
def test_prepare_refuses_what_it_refused(ray_cluster, tiny_prepared, tmp_path, case):
  """Same exception type and message (launch.py turns them into exit 2)."""
  import shutil

  from omnisage.data.omnisearchsage import prepare
  config, prepared = tiny_prepared
  raw = tmp_path / "raw"
  shutil.copytree(os.path.join(os.path.dirname(prepared), "raw"), raw)
  REFUSED[case](raw)
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    prepare.prepare(config, str(raw), str(tmp_path / "out"))
  assert (type(error.value).__name__, str(error.value)) == refusal(case, raw)


# --- 4. the engaged-query lists against a key-by-key reference, and `launch.py prepare` ---------
def test_engaged_lists_vs_key_by_key_reference():
  """ray_features.engaged_block (every key's windows merged at once, in Arrow) against
  tests/test_features.windowed_engaged_queries (features.merge_engaged_queries /
  uncertain_merge_keys key by key) on random logs: ties, non-ASCII queries, short top lists,
  several refresh windows."""
  from omnisage.data.omnisearchsage import ray_features
  from omnisage.data.omnisearchsage.log_rows import DAY
  from tests.test_features import windowed_engaged_queries
  rng = np.random.default_rng(0)
  words = np.array(["a", "b", "ab", "B", "é", "e\u0301", "ä", "日本", "a b", "ß", "aa"], object)
  uncertain_seen = 0
  for trial in range(12):
    n = int(rng.integers(1, 2000))
    log = dict(entity=rng.integers(0, int(rng.integers(1, 25)), n),
               engagement=rng.integers(0, 3, n), query=words[rng.zipf(1.3, n) % len(words)],
               timestamp=rng.integers(0, 30 * DAY, n))
    for top, refresh in ((1, 1), (2, 3), (3, 7), (5, 0)):
      want, want_unsure = windowed_engaged_queries(log, np.ones(n, bool), top, refresh)
      ts = log["timestamp"]
      got = ray_features.engaged_block(pa.table(dict(
          kind=pa.array(["pins"] * n), entity=pa.array(log["entity"]),
          engagement=pa.array(log["engagement"]), query=pa.array(list(log["query"])),
          window=pa.array(ts // (refresh * DAY) if refresh else np.zeros_like(ts)),
          count=pa.array(np.ones(n, np.int64)))), top)
      keys = list(zip(got["entity"].to_pylist(), got["engagement"].to_pylist()))
      assert dict(zip(keys, (list(zip(q, c)) for q, c in zip(
          got["queries"].to_pylist(), got["counts"].to_pylist())))) == want, (trial, top)
      assert {k for k, u in zip(keys, got["uncertain"].to_pylist()) if u} == want_unsure
      uncertain_seen += len(want_unsure)
  assert uncertain_seen > 0   # the certification check was exercised


def test_launch_prepare_on_a_cluster(ray_cluster, tiny_prepared, tmp_path):
  """`launch.py prepare --config.data.ray_address=<the two-node cluster>` (a child process that
  joins the cluster, as on a real one) writes the tiny world's directory; a raw table prepare
  refuses (invalid UTF-8, found in a Ray task) ends with exit 2, `error: <prepare's message>`,
  no traceback."""
  import shutil

  from tests.helpers import TINY_CONFIG, last_json, run_launch
  _, prepared = tiny_prepared
  raw = os.path.join(os.path.dirname(prepared), "raw")
  flags = [f"--config={TINY_CONFIG}:tiny", f"--config.data.ray_address={ray_cluster.address}"]
  result = run_launch("prepare", *flags, f"--workdir={tmp_path / 'ok'}",
                      f"--config.data.raw_dir={raw}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["prepare"]
  assert summary["ray_address"] == ray_cluster.address
  assert summary["prepared_dir"] == str(tmp_path / "ok" / "prepared")
  assert digest_diff(prepared_digest(summary["prepared_dir"]), load_fixture()) == []

  broken = tmp_path / "broken"
  shutil.copytree(raw, broken)
  case = "invalid UTF-8 in a later block"
  REFUSED[case](broken)
  result = run_launch("prepare", *flags, f"--workdir={tmp_path / 'bad'}",
                      f"--config.data.raw_dir={broken}")
  assert result.returncode == 2, result.stderr[-3000:]
  message = refusal(case, broken)[1]
  assert f"error: {message}" in result.stderr and "Traceback" not in result.stderr
  assert last_json(result)["prepare"] == {"error": message}


def test_entity_indices_against_a_dict_reference():
  from omnisage.data.omnisearchsage.entity_rows import RowChecks
  from omnisage.data.omnisearchsage.id_index import IdIndex
  from omnisage.data.omnisearchsage.log_rows import entity_indices
  pins, products = ["p0", "p1", "p2"], ["x0", "p1"]
  kind = np.array(["pins", "products", "queries", "pins", "products", "pins", None, "pins"], object)
  ids = pa.chunked_array([["p2", "p1", "q", "zz"], ["x0", None, "p0", "p1"]])
  rows = RowChecks(len(kind))
  rows.flag(np.arange(len(kind)) == 7, "missing_field")   # already bad: not re-flagged
  got = entity_indices(kind, ids, {"pins": IdIndex(pins), "products": IdIndex(products)}, rows)
  maps = {"pins": {p: i for i, p in enumerate(pins)},
          "products": {p: i for i, p in enumerate(products)}}
  want = [maps.get(k, {}).get(i, -1) for k, i in zip(kind, ids.to_pylist())]
  np.testing.assert_array_equal(got, want)
  assert rows.counts() == {"missing_field": 1, "unknown_entity": 2}   # "zz", and the null id
