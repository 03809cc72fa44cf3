"""The query tower's lexical path (models/lexical_path.py; Huang et al. KDD 2020): the query's
n-grams through the entity tower's OWN hash table, against a NumPy reference; it starts as a
no-op; prepare's n-gram ids equal the pure-Python serving encoder's; and a trained lexical model
gives the same query vectors through its bundle (raw text -> QueryEncoder -> bundle) as through
the model (TrainedTowers.query_texts)."""

import os

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

from omnisage.data import text
from omnisage.data.omnisearchsage.query_input import QueryEncoder, lexical_len, pad_rows
from tests.helpers import common_flags, last_json, run_launch, tiny_config

LEXICAL = ("--config.model.query.lexical=True",)


def lexical_config(width: int = 12):
  config = tiny_config()
  config.model.query.lexical = True
  config.data.query_lexical_len = width
  return config


def build(config, ngram_vocab: int = 300):
  from omnisage.models.omnisearchsage import build_model
  return build_model(config, {"query": 500, "ngram": ngram_vocab})


def packed_rows(rng, batch: int, config, ngram_vocab: int = 300) -> np.ndarray:
  lq, ll = config.data.batch_query_len, lexical_len(config)
  wordpiece = np.zeros((batch, lq), np.int32)
  wordpiece[:, 0] = 2
  wordpiece[:, 1:5] = rng.integers(5, 500, (batch, 4))
  ngrams = np.where(np.arange(ll) < rng.integers(0, ll + 1, (batch, 1)),
                    rng.integers(1, ngram_vocab, (batch, ll)), 0).astype(np.int32)
  return np.concatenate([wordpiece, ngrams], 1)


def test_lexical_len_is_zero_unless_switched_on():
  config = tiny_config()
  assert lexical_len(config) == 0
  config.model.query.lexical = True
  assert lexical_len(config) == config.data.query_lexical_len > 0
  config.data.query_lexical_len = 0
  with pytest.raises(ValueError, match="query_lexical_len"):
    lexical_len(config)


def test_shares_the_entity_hash_table_and_starts_as_a_no_op():
  config = lexical_config()
  model = build(config)
  assert model.query_tower.lexical.hash is model.entity_tower.hash
  # One copy in the model's state (a shared variable is stored once, under the entity tower).
  params = nnx.state(model, nnx.Param)
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
  assert sum(p.endswith("hash/table") for p in paths) == 1
  rows = packed_rows(np.random.default_rng(0), 5, config)
  plain = build(tiny_config())   # same seed, no lexical path: the same transformer weights
  np.testing.assert_allclose(model.query_tower(jnp.asarray(rows)),
                             plain.query_tower(jnp.asarray(rows[:, :config.data.batch_query_len])),
                             atol=1e-6)


def title_vectors(h, ids: np.ndarray) -> np.ndarray:
  """NumPy reference of the entity tower's title-field vector of n-gram ids [B, L] (0: padding):
  the hashed embeddings weighted per token and summed, LayerNorm-ed with the title field's scale
  and bias; a row without n-grams is zero (it adds nothing)."""
  table, weights = np.asarray(h.table[...]), np.asarray(h.token_weights[...])
  index = np.asarray(h.hash_indices[...])
  title = 0   # FIELDS.index("title")
  emb = np.einsum("blk,blkd->bld", weights[ids], table[index[ids]])
  summed = (emb * (ids != 0)[..., None]).sum(1)
  normed = (summed - summed.mean(-1, keepdims=True)) / np.sqrt(summed.var(-1, keepdims=True) + 1e-6)
  lexical = normed * np.asarray(h.field_scale[...])[title] + np.asarray(h.field_bias[...])[title]
  return lexical * (ids != 0).any(1, keepdims=True)


def test_matches_the_numpy_reference():
  config = lexical_config()
  model = build(config)
  tower = model.query_tower
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=tower.lexical.projection.kernel.shape).astype(np.float32)
  tower.lexical.projection.kernel[...] = kernel
  rows = packed_rows(rng, 7, config)
  got = np.asarray(tower(jnp.asarray(rows)))

  lq = config.data.batch_query_len
  lexical = title_vectors(model.entity_tower.hash, rows[:, lq:])
  transformer = np.asarray(tower.projection(tower.encode(jnp.asarray(rows[:, :lq]))[:, 0]))
  want = transformer + lexical @ kernel
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_query_gradient_reaches_the_shared_table():
  config = lexical_config()
  model = build(config)
  model.query_tower.lexical.projection.kernel[...] = jnp.ones_like(
      model.query_tower.lexical.projection.kernel[...])
  rows = jnp.asarray(packed_rows(np.random.default_rng(2), 4, config))
  grads = nnx.grad(lambda m: m.query_tower(rows).sum() ** 2)(model)
  table_grad = np.asarray(grads["entity_tower"]["hash"]["table"][...])
  assert np.abs(table_grad).sum() > 0


def test_prepared_ngram_ids_equal_the_serving_encoder(tiny_prepared):
  config, prepared = tiny_prepared
  table = pq.read_table(os.path.join(prepared, "entities", "queries.parquet"))
  vocab = text.NgramVocab.load(os.path.join(prepared, "ngram_vocab"))
  texts = table.column("text").to_pylist()
  stored = table.column("lexical").to_pylist()
  assert sum(map(len, stored)) > len(stored)   # queries do share n-grams with entity text
  for query, ids in zip(texts, stored):
    assert vocab.encode(query).tolist() == ids
    # Serving sees the raw text (any case, extra spaces): the same ids.
    assert vocab.encode("  " + query.upper() + " ").tolist() == ids
  padded, cut = pad_rows(stored, 4)
  assert padded.shape == (len(stored), 4)
  assert cut == sum(len(r) > 4 for r in stored)


def test_store_without_lexical_column_is_a_clear_error(tiny_prepared, tmp_path):
  import shutil

  from omnisage.data.omnisearchsage.entity_store import EntityStore
  _, prepared = tiny_prepared
  (tmp_path / "entities").mkdir()
  table = pq.read_table(os.path.join(prepared, "entities", "queries.parquet"))
  pq.write_table(table.drop(["lexical"]), tmp_path / "entities" / "queries.parquet")
  with pytest.raises(ValueError, match="no 'lexical' column"):
    EntityStore.load(str(tmp_path), "queries", 16, lexical_len=8)
  shutil.rmtree(tmp_path / "entities")


@pytest.fixture(scope="module")
def lexical_bundle(tiny_prepared, tmp_path_factory):
  config, prepared = tiny_prepared
  workdir = tmp_path_factory.mktemp("lexical_run")
  trained = run_launch("train", *common_flags(workdir, prepared), *LEXICAL,
                       "--config.train.steps=8")
  assert trained.returncode == 0, trained.stderr[-3000:]
  bundle = str(workdir / "bundle")
  exported = run_launch("export", *common_flags(workdir, prepared), *LEXICAL, f"--out={bundle}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert last_json(exported)["export"]["dims"]["query_lexical_len"] == 48
  return workdir, bundle


def test_bundle_equals_model_on_raw_text(tiny_prepared, lexical_bundle):
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.train.omnisearchsage.towers import TrainedTowers
  config, prepared = tiny_prepared
  workdir, bundle_dir = lexical_bundle
  config = tiny_config()
  config.data.prepared_dir = prepared
  config.model.query.lexical = True
  towers = TrainedTowers(config, str(workdir))
  texts = pq.read_table(os.path.join(prepared, "entities", "queries.parquet")
                        ).column("text").to_pylist()[:9] + ["  Cordless DRILL 18v  "]
  want = towers.query_texts(texts)

  bundle = load_bundle(bundle_dir)
  encoder = QueryEncoder.from_bundle(bundle)
  rows = encoder.encode_batch([text.normalize(t) for t in texts], bundle.dims["query_len"])
  assert rows.shape == (len(texts), 16 + 48)
  np.testing.assert_allclose(bundle.embed_queries(rows), want, atol=2e-5)
  # The lexical path was trained: it moves the vectors (the packed n-grams matter).
  no_ngrams = rows.copy()
  no_ngrams[:, 16:] = 0
  assert np.abs(bundle.embed_queries(no_ngrams) - want).max() > 1e-4
  with pytest.raises(ValueError, match="lexical path"):
    bundle.embed_queries(rows[:, :16])


def test_served_search_uses_the_lexical_encoder(lexical_bundle, tiny_prepared, tmp_path):
  """The HTTP service tokenises with QueryEncoder.from_bundle: its vectors equal the bundle's."""
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.omnisearchsage.service import create_app
  from tests.helpers import build_tiny_index, running
  config, prepared = tiny_prepared
  workdir, bundle_dir = lexical_bundle
  index = build_tiny_index((config, prepared, str(workdir), bundle_dir, None), tmp_path)[2]
  import httpx
  bundle = load_bundle(bundle_dir)
  rows = QueryEncoder.from_bundle(bundle).encode_batch(["red velvet cake"],
                                                       bundle.dims["query_len"])
  want = bundle.embed_queries(rows)[0]
  with running(create_app(bundle_dir, index)) as url:
    reply = httpx.post(f"{url}/v1/embed", json={"queries": ["red velvet cake"]}, timeout=30)
  assert reply.status_code == 200, reply.text
  got = np.asarray(reply.json()["embeddings"][0], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-5)



def channel_config(lexical_dim: int | None = None, weight: float = 0.4):
  config = lexical_config()
  config.model.lexical_dim = lexical_dim or config.model.text_dim
  config.model.lexical_weight = weight
  return config


def test_lexical_channel_scores_are_the_weighted_sum_of_two_cosines():
  """[sqrt(1-w) dense | sqrt(w) lexical] on both sides: q.e = (1-w) cos(dense) + w cos(n-grams),
  and the orthogonal start keeps the n-gram bags' cosine."""
  from omnisage.models.omnisearchsage import output_dim
  config = channel_config(weight=0.4)
  model = build(config)
  d = config.model.embed_dim
  assert output_dim(config.model) == d + config.model.text_dim
  rng = np.random.default_rng(3)
  rows = packed_rows(rng, 6, config)
  lq = config.data.batch_query_len
  rows[5, lq:] = 0   # a query with no n-grams
  rows[:5, lq] = np.maximum(rows[:5, lq], 1)
  q = np.asarray(model.query_tower(jnp.asarray(rows)))
  # Entities whose titles are exactly the queries' n-grams (field 0 = title), then unrelated ones.
  width = config.data.max_entity_tokens
  tokens = np.zeros((12, width), np.int32)
  tokens[:6, :rows.shape[1] - lq] = rows[:, lq:]
  tokens[6:, :20] = rng.integers(1, 300, (6, 20))
  tokens[:, width - 1] = np.where(tokens[:, 0] == 0, 7, 0)   # no entity without a title
  fields = np.zeros_like(tokens)
  continuous = rng.normal(size=(12, 1536)).astype(np.float32)
  e = np.asarray(model.entity_tower(jnp.asarray(tokens), jnp.asarray(fields),
                                    jnp.asarray(continuous)))
  assert q.shape == (6, d + 64) and e.shape == (12, d + 64)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  w = 0.4
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  has = (rows[:, lq:] != 0).any(1)   # queries with n-grams; a query without has a unit dense half
  assert has.sum() >= 3 and (~has).sum() >= 1
  np.testing.assert_allclose(np.linalg.norm(q[:, :d], axis=1), np.where(has, np.sqrt(1 - w), 1),
                             atol=1e-5)
  want = (1 - w) * unit(q[:, :d]) @ unit(e[:, :d]).T + w * unit(q[:, d:]) @ unit(e[:, d:]).T
  np.testing.assert_allclose((q @ e.T)[has], want[has], atol=1e-5)

  # The lexical halves against a NumPy reference: LayerNorm-ed title sums through the kernel.
  kernel = np.asarray(model.entity_tower.lexical_channel.projection.kernel[...])
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(kernel.shape[1]), atol=1e-5)
  for got, ids in ((q[has, d:], rows[has, lq:]), (e[:, d:], tokens)):
    want_half = np.sqrt(w) * unit(title_vectors(model.entity_tower.hash, ids) @ kernel)
    np.testing.assert_allclose(got, want_half, atol=2e-5)
  np.testing.assert_allclose(q[~has, d:], 0.0)
  # The same n-grams on both sides: the lexical halves agree exactly (one table, one map).
  np.testing.assert_allclose((unit(q[:, d:]) * unit(e[:6, d:])).sum(1)[has], 1.0, atol=1e-5)


def test_lexical_channel_is_one_module_shared_by_both_towers():
  config = channel_config(lexical_dim=16)
  model = build(config)
  assert model.query_tower.lexical.channel is model.entity_tower.lexical_channel
  assert model.query_tower.lexical.projection is None   # no additive block beside it
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert sum(p.endswith("lexical_channel/projection/kernel") for p in paths) == 1
  weight = model.entity_tower.lexical_channel.weight
  np.testing.assert_allclose(float(weight), 0.4, rtol=1e-6)
  # The weight is learned: a loss that wants more lexical score moves it.
  rows = jnp.asarray(packed_rows(np.random.default_rng(4), 4, config))
  grads = nnx.grad(lambda m: -(m.query_tower(rows)[:, 256:] ** 2).sum())(model)
  assert float(grads["entity_tower"]["lexical_channel"]["mix"][...]) < 0


def test_lexical_channel_needs_the_query_ngrams():
  config = tiny_config()
  config.model.lexical_dim = 16
  with pytest.raises(ValueError, match="model.query.lexical"):
    build(config)
  config = channel_config(weight=1.0)
  with pytest.raises(ValueError, match="lexical_weight"):
    build(config)


def test_lexical_channel_through_export_and_bundle(tiny_prepared, tmp_path):
  """A trained channel model: the bundle's dims say the wider output, and raw text through the
  bundle gives the model's query vectors."""
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.train.omnisearchsage.towers import TrainedTowers
  config, prepared = tiny_prepared
  flags = (*common_flags(tmp_path, prepared), *LEXICAL, "--config.model.lexical_dim=16")
  trained = run_launch("train", *flags, "--config.train.steps=4")
  assert trained.returncode == 0, trained.stderr[-3000:]
  exported = run_launch("export", *flags, f"--out={tmp_path / 'bundle'}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  config = tiny_config()   # as the flags say: the default query_lexical_len
  config.model.query.lexical, config.model.lexical_dim = True, 16
  config.data.prepared_dir = prepared
  assert last_json(exported)["export"]["dims"]["embed_dim"] == config.model.embed_dim + 16
  towers = TrainedTowers(config, str(tmp_path))
  texts = pq.read_table(os.path.join(prepared, "entities", "queries.parquet")
                        ).column("text").to_pylist()[:6]
  bundle = load_bundle(str(tmp_path / "bundle"))
  rows = QueryEncoder.from_bundle(bundle).encode_batch([text.normalize(t) for t in texts],
                                                       bundle.dims["query_len"])
  np.testing.assert_allclose(bundle.embed_queries(rows), towers.query_texts(texts), atol=2e-5)
  products = towers.entities("products")
  assert products.shape[1] == config.model.embed_dim + 16
  np.testing.assert_allclose(np.linalg.norm(products, axis=1), 1.0, atol=1e-5)
