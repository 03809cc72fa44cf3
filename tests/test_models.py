"""Tests of omnisage.models: hash embedding vs a NumPy reference of SPEC §1, towers, sharding."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage.schema import FIELDS
from omnisage.models import (
  CONTINUOUS_DIM,
  EntityTower,
  HashEmbedding,
  QueryConfig,
  QueryTower,
  build_model,
  compat_query,
  legacy_embedding,
)
from omnisage.models.hash_embedding import HASH_PRIME, hash_coefficients, hash_index_table
from tests.helpers import ROOT, subprocess_env

SHARDED = {"table", "token_weights", "hash_indices"}


def _small_hash(vocab=37, rows=11, dim=6, fields=3, seed=7):
  emb = HashEmbedding(vocab_size=vocab, hash_rows=rows, dim=dim, num_fields=fields, hash_seed=seed,
                      rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  # Non-trivial W and per-field LayerNorm so the reference checks every term of the formula.
  emb.token_weights.set_value(jnp.asarray(rng.normal(size=emb.token_weights.shape), jnp.float32))
  emb.field_scale.set_value(jnp.asarray(rng.normal(size=(fields, dim)), jnp.float32))
  emb.field_bias.set_value(jnp.asarray(rng.normal(size=(fields, dim)), jnp.float32))
  return emb


def _reference_fields(emb, tokens, fields, seed):
  """SPEC: emb(i) = W[i,1] E[h1(i)] + W[i,2] E[h2(i)], summed per field, LayerNorm; absent = 0."""
  a, b = hash_coefficients(seed)
  E, W = np.asarray(emb.table[...]), np.asarray(emb.token_weights[...])
  scale, bias = np.asarray(emb.field_scale[...]), np.asarray(emb.field_bias[...])
  out = np.zeros((tokens.shape[0], emb.num_fields, emb.dim), np.float64)
  for r in range(tokens.shape[0]):
    sums = np.zeros((emb.num_fields, emb.dim))
    seen = set()
    for i, f in zip(tokens[r].tolist(), fields[r].tolist()):
      if i == 0:
        continue
      h = [((int(a[k]) * i + int(b[k])) % HASH_PRIME) % emb.hash_rows for k in range(2)]
      sums[f] += W[i, 0] * E[h[0]] + W[i, 1] * E[h[1]]
      seen.add(f)
    for f in seen:
      s = sums[f]
      out[r, f] = (s - s.mean()) / np.sqrt(s.var() + 1e-6) * scale[f] + bias[f]
  return out


def test_hash_embedding_matches_numpy_reference():
  emb = _small_hash()
  tokens = np.array([[5, 9, 0, 36, 5, 0], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0]], np.int32)
  fields = np.array([[0, 0, 2, 2, 1, 1], [0, 1, 2, 0, 1, 2], [2, 2, 2, 2, 0, 1]], np.int32)
  run = nnx.jit(lambda m, t, f: (m.field_embeddings(t, f, 3), m(t)))
  got, per_token = (np.asarray(x) for x in run(emb, jnp.asarray(tokens), jnp.asarray(fields)))
  np.testing.assert_allclose(got, _reference_fields(emb, tokens, fields, seed=7), atol=1e-5)
  # Padding contributes nothing, absent fields are exactly zero (not the LayerNorm bias).
  assert np.all(per_token[tokens == 0] == 0) and np.all(per_token[tokens != 0] != 0)
  assert np.all(got[1] == 0) and np.all(got[0, 1] != 0) and np.all(got[2, 1] == 0)
  present = np.asarray(HashEmbedding.field_present(jnp.asarray(tokens), jnp.asarray(fields), 3))
  np.testing.assert_array_equal(present, [[1, 1, 1], [0, 0, 0], [0, 0, 1]])


def test_hash_indices_in_range_padded_and_distinct():
  table = hash_index_table(50_000, 1_000, seed=1234)
  assert table.dtype == np.int32 and table.shape == (50_000, 2)
  assert table.min() >= 0 and table.max() < 1_000
  assert np.mean(table[:, 0] != table[:, 1]) > 0.99      # two different hash functions
  assert np.array_equal(table, hash_index_table(50_000, 1_000, seed=1234))   # fixed by the seed
  # Large ids would overflow int32 arithmetic; the int64 table must match Python's big ints.
  a, b = hash_coefficients(3)
  big = hash_index_table(2**20 + 5, 100_000, seed=3)[-1]
  i = 2**20 + 4
  assert big.tolist() == [((int(a[k]) * i + int(b[k])) % HASH_PRIME) % 100_000 for k in range(2)]
  emb = _small_hash(vocab=37, rows=11)
  assert emb.token_weights.shape == (40, 2) and emb.hash_indices.shape == (40, 2)
  assert emb.table.shape == (16, 6)   # rows padded to a multiple of 8; only 11 are ever hashed to
  assert np.asarray(emb.hash_indices[...]).max() < 11


def _entity_tower(**kw):
  args = dict(vocab_size=1001, hash_rows=500, text_dim=16, num_fields=len(FIELDS),
              continuous_dim=CONTINUOUS_DIM, mlp_hidden=32, embed_dim=24, hash_seed=5,
              rngs=nnx.Rngs(0))
  return EntityTower(**{**args, **kw})


def test_entity_tower_shape_norm_and_zero_safety():
  tower = _entity_tower()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 1001, (4, 30)), jnp.int32)
  fields = jnp.asarray(rng.integers(0, len(FIELDS), (4, 30)), jnp.int32)
  cont = jnp.asarray(rng.random((4, CONTINUOUS_DIM)), jnp.float32)
  apply = nnx.jit(lambda m, *args: m(*args))
  out = apply(tower, tokens, fields, cont)
  assert out.shape == (4, 24)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  # An entity with no text and no features: finite output and finite gradients (no NaN from L2).
  empty = (jnp.zeros((2, 30), jnp.int32), jnp.zeros((2, 30), jnp.int32),
           jnp.zeros((2, CONTINUOUS_DIM)))
  assert np.all(np.isfinite(apply(tower, *empty)))
  grads = nnx.jit(nnx.grad(lambda m: m(*empty).sum()))(tower)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_partition_specs_shard_only_hash_tables():
  model = build_model(get_config("tiny"), {"query": 300, "ngram": 1001})
  flat = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model)))
  seen = set()
  for path, spec in flat:
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    if path[-1] in SHARDED:
      assert spec == P("model", None), path
      seen.add(path[-1])
    else:
      assert spec == P(), (path, spec)
  assert seen == SHARDED
  expected_t = get_config("tiny").loss.temperature_init
  assert float(model.log_temperature[...]) == pytest.approx(expected_t)


_MESH_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from configs.omnisage_synthetic import get_config
  from omnisage.models import build_model, CONTINUOUS_DIM

  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = build_model(get_config("tiny"), {"query": 300, "ngram": 1001})
    h = model.entity_tower.hash
    for var in (h.table, h.token_weights, h.hash_indices):
      arr = var[...]
      assert arr.sharding.spec == P("model", None), arr.sharding
      shard_shapes = {s.data.shape for s in arr.addressable_shards}
      assert shard_shapes == {(arr.shape[0] // 2, arr.shape[1])}, shard_shapes   # split over model
    assert model.query_tower.projection.kernel[...].sharding.is_fully_replicated

    rng = np.random.default_rng(0)
    batch = NamedSharding(mesh, P("data"))
    tokens = rng.integers(0, 1001, (8, 20)).astype(np.int32)
    fields = rng.integers(0, 8, (8, 20)).astype(np.int32)
    cont = rng.random((8, CONTINUOUS_DIM)).astype(np.float32)
    query = rng.integers(1, 300, (8, 12)).astype(np.int32)
    args = [jax.device_put(x, batch) for x in (tokens, fields, cont, query)]

    @nnx.jit
    def apply(model, tokens, fields, cont, query):
      return (model.entity_tower(tokens, fields, cont), model.query_tower(query),
              model.entity_tower.hash(tokens))
    ent, q, tok = apply(model, *args)
    assert ent.shape == (8, 256) and q.shape == (8, 256)
    assert np.allclose(np.linalg.norm(ent, axis=-1), 1, atol=1e-5)
    # The sharded gather gives the same per-token embeddings as plain NumPy indexing.
    E, W, I = (np.asarray(v[...]) for v in (h.table, h.token_weights, h.hash_indices))
    ref = (W[tokens][..., None] * E[I[tokens]]).sum(-2) * (tokens != 0)[..., None]
    assert np.allclose(np.asarray(tok), ref, atol=1e-5)
  print("MESH_OK")
""")


def test_model_on_8_device_mesh():
  res = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=subprocess_env(8),
                       capture_output=True, text=True, timeout=300)
  assert "MESH_OK" in res.stdout, res.stdout + res.stderr


def _query_tower(**kw):
  c = QueryConfig(**{**dict(vocab_size=100, hidden=32, layers=2, heads=4, intermediate=64,
                            max_len=16, embed_dim=20), **kw})
  return QueryTower(c, rngs=nnx.Rngs(0))


def test_query_tower_shapes_and_padding_mask():
  tower = _query_tower(type_vocab_size=2)
  tokens = jnp.asarray([[2, 17, 33, 3], [2, 50, 3, 0]], jnp.int32)
  run = nnx.jit(lambda m, t: (m.encode(t), m.mean_pooled(t), m(t)))
  hidden, pooled, out = run(tower, tokens)
  assert hidden.shape == (2, 4, 32) and pooled.shape == (2, 32) and out.shape == (2, 20)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  # Extra padding changes neither the CLS output nor the mean-pooled state...
  _, pooled_padded, out_padded = run(tower, jnp.pad(tokens, ((0, 0), (0, 6))))
  np.testing.assert_allclose(out_padded, out, atol=1e-5)
  np.testing.assert_allclose(pooled_padded, pooled, atol=1e-5)
  # ...while a real token there does.
  assert not np.allclose(run(tower, tokens.at[1, 3].set(9))[2], out, atol=1e-3)
  with pytest.raises(ValueError, match="max_len"):
    tower(jnp.ones((1, 17), jnp.int32))


def test_compat_helpers():
  q = legacy_embedding(jnp.asarray([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(q, [[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
  x = jnp.asarray([[1.0, 1.0, 5.0, 5.0]]) / jnp.sqrt(52.0)
  np.testing.assert_allclose(compat_query(x, 2), [[2**-0.5, 2**-0.5]], atol=1e-6)
  with pytest.raises(ValueError):
    compat_query(x, 8)
