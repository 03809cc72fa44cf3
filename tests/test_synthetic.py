"""omnisage.data.omnisearchsage.synthetic: determinism, the raw schema, learnable topic structure,
and defects."""

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.data import text
from omnisage.data.omnisearchsage import schema, synthetic
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  config = tiny_config()
  out = str(tmp_path_factory.mktemp("raw"))
  summary = synthetic.generate(config.synthetic, config.seed, out)
  tables = {n: pq.read_table(os.path.join(out, f"{n}.parquet")) for n in schema.RAW_TABLES}
  return config, out, summary, tables


def test_deterministic_bytes(world, tmp_path):
  config, out, _, _ = world
  synthetic.generate(config.synthetic, config.seed, str(tmp_path / "again"))
  synthetic.generate(config.synthetic, config.seed + 1, str(tmp_path / "other"))
  for name in schema.RAW_TABLES:
    a = open(os.path.join(out, f"{name}.parquet"), "rb").read()
    assert a == (tmp_path / "again" / f"{name}.parquet").read_bytes(), name
    assert a != (tmp_path / "other" / f"{name}.parquet").read_bytes(), name


def test_schema_and_sizes(world):
  config, _, summary, tables = world
  s = config.synthetic
  for name, cols in schema.RAW_TABLES.items():
    assert tuple(tables[name].column_names) == cols
    assert summary["rows"][name] == tables[name].num_rows
  log = tables["queries_log"]
  assert log.schema.field("query").type == pa.binary()
  assert log.schema.field("timestamp").type == pa.int64()
  assert tables["pins"].schema.field("pinsage").type == pa.list_(pa.float32())
  assert tables["pins"].schema.field("visual_bits").type == pa.binary()
  assert tables["products"].schema.field("image_bits").type == pa.list_(pa.binary())
  n_bad_log = sum(summary["bad_rows"]["queries_log"].values())
  assert log.num_rows == s.num_query_pin + s.num_query_product + s.num_query_query + n_bad_log
  assert tables["pins"].num_rows == s.num_pins + sum(summary["bad_rows"]["pins"].values())
  ts = log["timestamp"].to_numpy()
  assert np.all(np.diff(ts) >= 0)  # logs arrive in time order
  assert ts.max() - ts.min() > (s.num_days - 1) * 86_400
  visual = [v for v in tables["pins"]["visual_bits"].to_pylist() if v is not None]
  assert {len(v) for v in visual} == {schema.VISUAL_DIM // 8}
  images = [i for row in tables["products"]["image_bits"].to_pylist() if row for i in row]
  assert {len(i) for i in images} == {schema.VISUAL_DIM // 8}
  counts = [len(r) for r in tables["products"]["image_bits"].to_pylist() if r]
  assert min(counts) == 1 and max(counts) == 4
  kinds = set(log["entity_kind"].to_pylist())
  assert kinds == set(schema.ENTITY_KINDS)
  eng = set(zip(log["entity_kind"].to_pylist(), log["engagement"].to_pylist()))
  assert eng == {("pins", "save"), ("pins", "long_click"), ("products", "save"),
                 ("products", "long_click"), ("products", "add_to_cart"),
                 ("products", "checkout"), ("queries", "click")}


def _words(s):
  return set(text.unigrams(s)) if s else set()


def test_queries_share_words_with_engaged_entities(world):
  """Topic structure a model can learn: engaged pins share words with the query far more often
  than random pins do."""
  _, _, _, tables = world
  pins = tables["pins"].to_pydict()
  pin_words = {i: _words(t) | _words(d) | _words(c) for i, t, d, c in zip(
      pins["id"], pins["title"], pins["description"], pins["caption"])}
  log = tables["queries_log"].to_pydict()
  rows = [(q.decode(errors="replace"), e) for q, k, e in zip(
      log["query"], log["entity_kind"], log["entity_id"])
      if k == "pins" and q is not None and e in pin_words and len(q) < 1000]
  rng = np.random.default_rng(0)
  ids = list(pin_words)
  hit = np.mean([bool(_words(q) & pin_words[e]) for q, e in rows])
  rand = np.mean([bool(_words(q) & pin_words[ids[rng.integers(len(ids))]]) for q, _ in rows])
  assert hit > 0.3 and hit > 8 * rand, (hit, rand)
  # The log's raw queries need NFKC + case folding: some differ from their normal form.
  raw = [q.decode(errors="replace") for q in log["query"] if q is not None and len(q) < 1000]
  assert 0.02 < np.mean([text.normalize(q) != q for q in raw]) < 0.5


def test_zipf_popularity(world):
  _, _, _, tables = world
  log = tables["queries_log"].to_pydict()
  counts = np.sort(np.unique([q for q in log["query"] if q], return_counts=True)[1])[::-1]
  # Heavy head: the top 5% of distinct raw queries carry far more than 5% of the traffic.
  head = counts[:math.ceil(0.05 * len(counts))].sum() / counts.sum()
  assert head > 0.25


def test_bad_rows_injected(world):
  config, _, summary, tables = world
  bad = summary["bad_rows"]
  assert all(n > 0 for reasons in bad.values() for n in reasons.values())
  log = tables["queries_log"].to_pydict()
  q = log["query"]
  assert sum(x is None for x in q) + sum(x is None for x in log["entity_id"]) == \
      bad["queries_log"]["missing_field"]

  def undecodable(b):
    try:
      b.decode("utf-8")
      return False
    except UnicodeDecodeError:
      return True

  assert sum(undecodable(x) for x in q if x) == bad["queries_log"]["undecodable_text"]
  assert sum(len(x) > 5_000 for x in q if x) == bad["queries_log"]["absurd_length"]
  assert config.synthetic.absurd_text_chars > config.data.max_text_chars
  ids = set(tables["pins"]["id"].to_pylist()) | set(tables["products"]["id"].to_pylist())
  unknown = sum(k in ("pins", "products") and e is not None and e not in ids
                for k, e in zip(log["entity_kind"], log["entity_id"]))
  assert unknown == bad["queries_log"]["unknown_entity"]
  for name, col in (("pins", "pinsage"), ("products", "itemsage")):
    vecs = tables[name][col].to_pylist()
    assert sum(v is not None and bool(np.isnan(v).any()) for v in vecs) == bad[name]["nan_vector"]
    assert tables[name]["id"].null_count == bad[name]["missing_field"]
  saves = tables["board_saves"].to_pydict()
  assert saves["board_title"].count(None) == bad["board_saves"]["missing_field"]
  pin_ids = set(tables["pins"]["id"].to_pylist())
  assert sum(p not in pin_ids for p in saves["pin_id"]) == bad["board_saves"]["unknown_entity"]


def test_missing_text_and_features(world):
  config, _, _, tables = world
  pins = tables["pins"].to_pydict()
  n = len(pins["id"])
  for col in ("title", "description", "pinsage", "visual_bits"):
    assert 0 < sum(v is None for v in pins[col]) < 0.3 * n, col
  # Captions mostly stand in where a title or description is missing.
  lacking = [t is None or d is None for t, d in zip(pins["title"], pins["description"])]
  with_caption = [c is not None for c in pins["caption"]]
  rate_lacking = np.mean([c for c, l in zip(with_caption, lacking) if l])
  rate_full = np.mean([c for c, l in zip(with_caption, lacking) if not l])
  assert rate_lacking > 0.7 and rate_full < 0.4 and sum(with_caption) < n
  images = tables["products"]["image_bits"].to_pylist()
  assert any(i is None for i in images) and any(i == [] for i in images)
  assert tables["products"]["itemsage"].null_count > 0
