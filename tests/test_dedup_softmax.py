"""The in-batch softmax over distinct queries and candidates equals the [B, B] form.

Reference: `losses.sampled_softmax_loss` on the rows expanded back (q[g_i], c[u_i]), itself tested
against a float64 NumPy loop in tests/test_losses.py, and a direct NumPy loop here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.models.compat import l2_normalize
from omnisage.train.dedup_softmax import dedup_inbatch_softmax_loss, dedup_rows
from omnisage.train.losses import sampled_softmax_loss


def zipf_batch(rng, b, num_queries, num_cands):
  """Rows with many repeated queries, candidates and (query, candidate) pairs."""
  users = rng.zipf(1.3, b) % num_queries
  items = (users * 7 + rng.zipf(1.5, b)) % num_cands
  return users, items


def embeddings(rng, n, d):
  return l2_normalize(jnp.asarray(rng.normal(size=(n, d)), jnp.float32))


def reference_loss(q, c, bias, rows, log_scale, mask_same_query):
  """The [B, B] loss on the expanded rows (sampled_softmax_loss, use_logq with log Q = bias)."""
  qr, cr = q[rows.row_query], c[rows.row_cand]
  b = len(rows.row_query)
  loss, _ = sampled_softmax_loss(
    qr, cr, log_temperature=log_scale, temperature_max=10.0,
    query_ids=jnp.asarray(rows.row_query) if mask_same_query else jnp.arange(b),
    pos_ids=jnp.asarray(rows.row_cand), pos_log_q=bias[rows.row_cand])
  return loss


def dedup_loss(q, c, bias, rows, log_scale, mask_same_query):
  return dedup_inbatch_softmax_loss(
    q, c, scale=jnp.exp(log_scale), col_bias=bias, row_query=rows.row_query,
    row_cand=rows.row_cand, cand_count=rows.cand_count, pair_count=rows.pair_count,
    mask_same_query=mask_same_query)


def test_dedup_rows_matches_a_loop():
  rng = np.random.default_rng(0)
  users, items = zipf_batch(rng, 300, 40, 60)
  d = dedup_rows(users, items, pad_multiple=16)
  assert d.num_queries == len(set(users)) and d.num_cands == len(set(items))
  assert len(d.query_keys) % 16 == 0 and len(d.cand_keys) % 16 == 0
  np.testing.assert_array_equal(d.query_keys[d.row_query], users)
  np.testing.assert_array_equal(d.cand_keys[d.row_cand], items)
  for u, key in enumerate(d.cand_keys):
    expect = int((items == key).sum()) if u < d.num_cands else 0   # padding counts 0
    assert d.cand_count[u] == expect
  for i in range(len(users)):
    assert d.pair_count[i] == int(((users == users[i]) & (items == items[i])).sum())


def test_dedup_rows_refuses_bad_shapes():
  with pytest.raises(ValueError, match="one length"):
    dedup_rows(np.arange(3), np.arange(4))
  with pytest.raises(ValueError, match="pad_multiple"):
    dedup_rows(np.arange(3), np.arange(3), pad_multiple=0)


@pytest.mark.parametrize("mask_same_query", [False, True])
def test_loss_and_gradients_equal_the_expanded_rows(mask_same_query):
  rng = np.random.default_rng(1)
  users, items = zipf_batch(rng, 512, 90, 150)
  rows = dedup_rows(users, items, pad_multiple=32)
  assert rows.num_queries < 0.6 * len(users) and rows.num_cands < 0.6 * len(users)
  g, u, d = len(rows.query_keys), len(rows.cand_keys), 16
  q, c = embeddings(rng, g, d), embeddings(rng, u, d)
  bias = jnp.asarray(-rng.uniform(0, 3, u), jnp.float32)
  log_scale = jnp.float32(math.log(12.0))
  args = (bias, rows, log_scale, mask_same_query)
  ref, ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2, 4))(q, c, *args)
  step = jax.jit(jax.value_and_grad(
    lambda q, c, bias, log_scale: dedup_loss(q, c, bias, rows, log_scale, mask_same_query),
    argnums=(0, 1, 2, 3)))
  got, got_grads = step(q, c, bias, log_scale)
  np.testing.assert_allclose(got, ref, rtol=2e-6)
  for name, a, b in zip(["q", "cands", "bias", "log_scale"], got_grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-7, err_msg=name)
  # Padded candidates take no part: their gradient is exactly 0.
  assert not np.any(np.asarray(got_grads[1])[rows.num_cands:])


def test_equals_a_numpy_loop_with_a_dominant_repeated_item():
  """One candidate fills most rows (the cancellation case) and one row has no negative left."""
  rng = np.random.default_rng(2)
  b = 200
  items = np.where(rng.random(b) < 0.8, 5, rng.integers(0, 40, b))
  users = rng.integers(0, 30, b)
  rows = dedup_rows(users, items, pad_multiple=8)
  q = embeddings(rng, len(rows.query_keys), 8)
  c = embeddings(rng, len(rows.cand_keys), 8)
  scale = 20.0
  logits = scale * np.asarray(q, np.float64) @ np.asarray(c, np.float64).T
  expect = []
  for i in range(b):
    row = logits[rows.row_query[i]][rows.row_cand]     # [B]: the logit of every row's column
    keep = items != items[i]
    pos = row[i]
    expect.append(np.logaddexp(pos, np.logaddexp.reduce(row[keep]) if keep.any() else -np.inf)
                  - pos)
  got = dedup_loss(q, c, jnp.zeros(len(rows.cand_keys)), rows, jnp.float32(math.log(scale)),
                   False)
  np.testing.assert_allclose(got, np.mean(expect), rtol=1e-5)

  # Every row has the same candidate: no negatives at all, the loss is 0 with finite gradients.
  alone = dedup_rows(users[:10], np.full(10, 3), pad_multiple=8)
  grads = jax.grad(dedup_loss, argnums=(0, 1))(q[:8], c[:8], jnp.zeros(8), alone,
                                                jnp.float32(math.log(scale)), False)
  assert float(dedup_loss(q[:8], c[:8], jnp.zeros(8), alone, jnp.float32(math.log(scale)),
                          False)) == pytest.approx(0.0, abs=2e-7)
  assert all(np.isfinite(np.asarray(x)).all() for x in grads)


def test_same_query_masking_needs_pair_counts():
  rows = dedup_rows(np.array([0, 0, 1]), np.array([1, 2, 1]), pad_multiple=4)
  q, c = jnp.ones((4, 2)), jnp.ones((4, 2))
  with pytest.raises(ValueError, match="pair_count"):
    dedup_inbatch_softmax_loss(q, c, scale=1.0, col_bias=jnp.zeros(4), row_query=rows.row_query,
                               row_cand=rows.row_cand, cand_count=rows.cand_count,
                               mask_same_query=True)
