"""benchmarks/vs_tfrs.py: the shared data and hash, the JAX side's loss and step (tiny sizes).

The TFRS side runs only where the peers virtualenv exists (`make peers`); otherwise it is skipped.
"""

import json
import os
import subprocess
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import vs_tfrs
from benchmarks.peers.twotower_data import hash_buckets, load_pairs, make_pairs, save_pairs

TINY = types.SimpleNamespace(buckets=1000, dim=8, hidden=16, temperature=0.1, lr=1e-2, warmup=1,
                             steps=12, loss_impl="dense", block_size=16, seed=0,
                             pad_multiple=16)


def test_pairs_are_seeded_zipf_and_taste_matched(tmp_path):
  users, items = make_pairs(num_pairs=20_000, seed=3, num_users=6400, num_items=640, groups=64)
  again = make_pairs(num_pairs=20_000, seed=3, num_users=6400, num_items=640, groups=64)
  assert users.dtype == items.dtype == np.int32 and users.shape == items.shape == (20_000,)
  np.testing.assert_array_equal(users, again[0])
  np.testing.assert_array_equal(items, again[1])
  assert not np.array_equal(users, make_pairs(num_pairs=20_000, seed=4, num_users=6400,
                                              num_items=640, groups=64)[0])
  np.testing.assert_array_equal(users % 64, items % 64)   # the learnable signal
  assert users.max() < 6400 and items.max() < 640 and min(users.min(), items.min()) >= 0
  # Zipf with exponent 1.1 over 6400 ids: the top id takes about 1 / H(6400, 1.1) ~ 16% of draws.
  top = np.bincount(users).max() / len(users)
  assert 0.12 < top < 0.2, top
  save_pairs(str(tmp_path), users, items)
  loaded = load_pairs(str(tmp_path))
  np.testing.assert_array_equal(loaded[0], users)
  with pytest.raises(FileNotFoundError, match="users.npy"):
    load_pairs(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="multiples of groups"):
    make_pairs(num_pairs=10, num_users=100, groups=64)


def test_jax_hash_matches_numpy_reference():
  ids = np.concatenate([np.arange(1000), np.random.default_rng(0).integers(0, 2**31 - 1, 5000),
                        [2**31 - 1]]).astype(np.int32)
  for buckets in (1000, 100_003):
    expected = hash_buckets(ids, buckets)
    np.testing.assert_array_equal(np.asarray(vs_tfrs.hash_buckets(jnp.asarray(ids), buckets)),
                                  expected)
    assert expected.max() < buckets
  with pytest.raises(ValueError, match="ids must lie"):
    hash_buckets(np.array([-1]), 10)


def reference_retrieval_loss(q, p, items, temperature):
  """TFRS Retrieval in NumPy: softmax over q p^T / T, same-item off-diagonal columns removed."""
  logits = q @ p.T / temperature
  dup = (items[:, None] == items[None, :]) & ~np.eye(len(items), dtype=bool)
  logits = np.where(dup, -np.inf, logits)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  return float(np.mean(lse - np.diag(logits)))


def test_jax_loss_is_tfrs_retrieval_loss():
  users, items = make_pairs(num_pairs=64, seed=1, num_users=640, num_items=128)
  assert len(np.unique(items)) < len(items)   # accidental hits are exercised
  model = vs_tfrs.JaxTwoTower(TINY.buckets, TINY.dim, TINY.hidden, rngs=nnx.Rngs(0))
  q = np.asarray(model.user_tower(jnp.asarray(users)), np.float64)
  p = np.asarray(model.item_tower(jnp.asarray(items)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
  got = float(vs_tfrs.jax_loss(model, jnp.asarray(users), jnp.asarray(items), TINY.temperature))
  assert got == pytest.approx(reference_retrieval_loss(q, p, items, TINY.temperature), rel=1e-5)


def test_dedup_loss_is_the_same_loss():
  """The headline side's loss over distinct users and items equals the [B, B] one."""
  users, items = make_pairs(num_pairs=256, seed=5, num_users=640, num_items=128)
  model = vs_tfrs.JaxTwoTower(TINY.buckets, TINY.dim, TINY.hidden, rngs=nnx.Rngs(0))
  rows = vs_tfrs.jax_loss(model, jnp.asarray(users), jnp.asarray(items), TINY.temperature)
  d = vs_tfrs.dedup_rows(users, items, pad_multiple=16)
  assert d.num_queries < 200 and d.num_cands < 200   # duplicates are exercised
  dedup = vs_tfrs.jax_dedup_loss(model, *map(jnp.asarray, (
    d.query_keys, d.cand_keys, d.row_query, d.row_cand, d.cand_count)), TINY.temperature)
  assert float(dedup) == pytest.approx(float(rows), rel=1e-5)


@pytest.mark.parametrize("dedup", [True, False])
def test_jax_side_learns(dedup):
  users, items = make_pairs(num_pairs=(TINY.warmup + TINY.steps) * 128, seed=2, num_users=640,
                            num_items=640)
  out = vs_tfrs.run_jax(users, items, TINY, 128, dedup=dedup)
  assert len(out["losses"]) == TINY.warmup + TINY.steps and out["examples_per_s"] > 0
  assert np.mean(out["losses"][-3:]) < 0.9 * out["losses"][0], out["losses"]
  summary = vs_tfrs.learning_check({"omnisage": out["losses"], "peer": out["losses"]})
  assert summary["ok"]
  assert not vs_tfrs.learning_check({"omnisage": out["losses"], "peer": [5.0] * 4})["ok"]


@pytest.mark.skipif(not os.path.exists(vs_tfrs.PEERS_PYTHON), reason="no .venv-peers (make peers)")
def test_tfrs_side_runs_and_learns(tmp_path):
  batch = 128
  users, items = make_pairs(num_pairs=(TINY.warmup + TINY.steps) * batch, seed=2, num_users=640,
                            num_items=640)
  save_pairs(str(tmp_path), users, items)
  args = types.SimpleNamespace(**vars(TINY), peers_python=vs_tfrs.PEERS_PYTHON, threads=1,
                               host_malloc="reuse")
  try:
    out = vs_tfrs.run_tfrs(str(tmp_path), args, batch, jit_compile=False)
  except subprocess.TimeoutExpired:
    pytest.fail("tfrs_side.py timed out")
  json.dumps(out)
  assert out["versions"]["tensorflow"].startswith("2.20")
  assert len(out["losses"]) == TINY.warmup + TINY.steps
  # Same data, same model and loss: the curves of both sides agree within a few percent.
  jax_losses = vs_tfrs.run_jax(users, items, TINY, batch, dedup=True)["losses"]
  assert vs_tfrs.learning_check({"omnisage": jax_losses, "tfrs": out["losses"]})["ok"]


def test_dedup_and_rows_steps_train_alike():
  """Same init, same batches: the two omnisage steps give the same loss curve."""
  users, items = make_pairs(num_pairs=(TINY.warmup + TINY.steps) * 128, seed=6, num_users=640,
                            num_items=640)
  dedup = vs_tfrs.run_jax(users, items, TINY, 128, dedup=True)
  rows = vs_tfrs.run_jax(users, items, TINY, 128, dedup=False)
  np.testing.assert_allclose(dedup["losses"], rows["losses"], rtol=1e-4)
  assert dedup["shapes"] and all(g % 16 == 0 and u % 16 == 0 for g, u in dedup["shapes"])
