"""Raw pin/product rows in, embeddings out (serving/omnisearchsage/raw_entities.py): a bundle
featurises raw rows with prepare's own code, so raw rows through the bundle equal the prepared
rows through the trained model; a missing input column or a bad row is an error naming it."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.data import text
from omnisage.data.omnisearchsage import schema
from tests.helpers import last_json, run_launch, tiny_config

PLAIN_FIELDS = {schema.FIELDS.index(f) for f in ("title", "description", "caption")}


def comparable_rows(prepared: str, raw_dir: str, kind: str):
  """(raw table of the entities whose prepared features come from their raw row alone, their
  prepared entity_index). Board titles and engaged queries are derived from logs by prepare, so
  entities that have them are left out."""
  table = pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet"))
  fields = table.column("fields").to_pylist()
  plain = [i for i, f in enumerate(fields) if f and set(f) <= PLAIN_FIELDS]
  ids = table.column("id").to_pylist()
  raw = pq.read_table(os.path.join(raw_dir, f"{kind}.parquet"))
  raw_ids = raw.column("id").to_pylist()
  first = {}
  for row, i in enumerate(raw_ids):
    first.setdefault(i, row)
  rows = [first[ids[i]] for i in plain]
  return raw.take(pa.array(rows)), np.asarray(plain)


@pytest.fixture(scope="module")
def world(tiny_bundle):
  config, prepared, workdir, bundle_dir, _ = tiny_bundle
  raw_dir = os.path.join(os.path.dirname(prepared), "raw")
  return prepared, raw_dir, workdir, bundle_dir


@pytest.mark.parametrize("kind", ["pins", "products"])
def test_raw_rows_through_the_bundle_equal_prepared_rows_through_the_model(world, kind):
  from omnisage.data.omnisearchsage.entity_rows import featurize_raw_entities
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.omnisearchsage.raw_entities import embed_raw_entities, raw_featurizer
  from omnisage.train.omnisearchsage.towers import TrainedTowers
  prepared, raw_dir, workdir, bundle_dir = world
  raw, index = comparable_rows(prepared, raw_dir, kind)
  assert len(index) >= 10, f"too few {kind} without log-derived fields to compare"
  bundle = load_bundle(bundle_dir)

  # The featurisation is prepare's, token for token.
  vocab, d = raw_featurizer(bundle)
  ents, bad = featurize_raw_entities(raw, kind, vocab, d, "test rows")
  assert bad == {}
  want_tokens = pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet")
                              ).column("tokens").to_pylist()
  assert ents["tokens"].to_pylist() == [want_tokens[i] for i in index]

  got = embed_raw_entities(bundle, raw, kind, batch_size=7)
  assert got["ids"] == [str(i) for i in raw.column("id").to_pylist()]
  config = tiny_config()
  config.data.prepared_dir = prepared
  want = TrainedTowers(config, workdir).entities(kind)[index]
  np.testing.assert_allclose(got["embeddings"], want, atol=2e-5)


def test_a_missing_column_is_an_error_naming_it(world):
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.omnisearchsage.raw_entities import embed_raw_entities
  prepared, raw_dir, _, bundle_dir = world
  raw, _ = comparable_rows(prepared, raw_dir, "products")
  with pytest.raises(ValueError, match=r"lacks columns \['itemsage'\]"):
    embed_raw_entities(load_bundle(bundle_dir), raw.drop(["itemsage"]), "products")


def test_a_bad_row_is_an_error_naming_the_row(world):
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.omnisearchsage.raw_entities import embed_raw_entities
  prepared, raw_dir, _, bundle_dir = world
  raw, _ = comparable_rows(prepared, raw_dir, "pins")
  raw = raw.slice(0, 5)
  vectors = raw.column("pinsage").to_pylist()
  vectors[3] = [float("nan")] * schema.LEGACY_DIM
  raw = raw.set_column(raw.column_names.index("pinsage"), "pinsage",
                       pa.array(vectors, raw.schema.field("pinsage").type))
  with pytest.raises(ValueError, match=r"1 of 5 rows.*row 3: nan_vector"):
    embed_raw_entities(load_bundle(bundle_dir), raw, "pins")


def test_launch_embed_takes_a_raw_table(world, tmp_path):
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.omnisearchsage.raw_entities import embed_raw_entities
  prepared, raw_dir, _, bundle_dir = world
  raw, _ = comparable_rows(prepared, raw_dir, "products")
  path = tmp_path / "products.parquet"
  pq.write_table(raw, path, row_group_size=6)
  out = tmp_path / "embeddings"
  result = run_launch("embed", f"--bundle={bundle_dir}", f"--entities={path}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["embed"]
  assert summary["rows_embedded"] == raw.num_rows
  shards = pq.read_table(out / "products")
  shards = shards.sort_by("entity_index")
  assert shards.column("entity_index").to_pylist() == list(range(raw.num_rows))
  assert shards.column("id").to_pylist() == raw.column("id").to_pylist()
  want = embed_raw_entities(load_bundle(bundle_dir), raw, "products")["embeddings"]
  np.testing.assert_allclose(np.stack(shards.column("embedding").to_numpy(zero_copy_only=False)),
                             want, atol=1e-6)
  assert shards.column("title").to_pylist() == [text.normalize(t or "")
                                                 for t in raw.column("title").to_pylist()]
