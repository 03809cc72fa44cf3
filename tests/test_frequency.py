"""omnisage.train.frequency vs a sequential NumPy reference of Yi et al. (RecSys 2019), Algorithm 2.

The reference hashes with its own NumPy copy of the documented scheme (so the scheme is pinned: a
checkpointed state is only meaningful with it) and walks each batch one item and one hash array at
a time, with the batch rule stated in `frequency.update`: a slot already updated at step t is not
updated again at step t.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.train import frequency
from tests.helpers import ROOT, subprocess_env

# One compiled update for the tests (alpha static; task, ids, step traced).
_update = jax.jit(frequency.update, static_argnums=(4,))
_log_q = jax.jit(frequency.log_q)


# --- reference ---------------------------------------------------------------------------------
def np_fmix32(h):
  h = np.asarray(h, np.uint32).copy()
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> np.uint32(13)
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> np.uint32(16)
  return h


def np_slots(task, ids, size, m):
  ids = np.asarray(ids, np.int32).view(np.uint32)
  out = []
  for i in range(m):
    with np.errstate(over="ignore"):  # uint32 wrap-around is the point
      salt = np_fmix32(np_fmix32(np.array(task, np.uint32) + np.uint32(0x6A09E667))
                       + np.array(i, np.uint32) * np.uint32(0x9E3779B9))
    out.append(np_fmix32(ids ^ salt) % np.uint32(size))
  return np.stack(out).astype(np.int64)


class RefYi:
  def __init__(self, size, m, alpha):
    self.a = np.zeros((m, size))
    self.b = np.zeros((m, size))
    self.size, self.m, self.alpha = size, m, alpha

  def update(self, task, ids, t):
    slots = np_slots(task, ids, self.size, self.m)
    done = set()
    for n in range(len(ids)):
      for i in range(self.m):
        h = slots[i, n]
        if (i, h) in done:
          continue
        done.add((i, h))
        self.b[i, h] = (1 - self.alpha) * self.b[i, h] + self.alpha * (t - self.a[i, h])
        self.a[i, h] = t

  def log_q(self, task, ids):
    slots = np_slots(task, ids, self.size, self.m)
    gap = np.max([self.b[i, slots[i]] for i in range(self.m)], axis=0)
    return -np.log(np.maximum(gap, 1.0))


# --- hashing ------------------------------------------------------------------------------------
def test_hash_matches_documented_scheme():
  ids = np.concatenate([np.arange(-5, 2000), [2**31 - 1, -(2**31)]]).astype(np.int32)
  for task, size, m in [(0, 1 << 14, 2), (3, 1000, 3), (1, 1 << 20, 1)]:
    got = np.asarray(frequency.hash_keys(task, ids, size, m))
    assert got.shape == (m, len(ids)) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np_slots(task, ids, size, m))
    assert got.min() >= 0 and got.max() < size
  # any id shape, and a traced task id under jit
  grid = jax.jit(frequency.hash_keys, static_argnums=(2, 3))(jnp.int32(3), ids[:12].reshape(3, 4),
                                                            1000, 3)
  np.testing.assert_array_equal(grid.reshape(3, -1), np_slots(3, ids[:12], 1000, 3))


def test_hash_spreads_and_separates_tasks():
  ids = np.arange(50_000, dtype=np.int32)
  size = 1 << 10
  s0 = np.asarray(frequency.hash_keys(0, ids, size, 2))
  s1 = np.asarray(frequency.hash_keys(1, ids, size, 2))
  counts = np.bincount(s0[0], minlength=size)
  assert counts.std() < 1.5 * np.sqrt(counts.mean())  # ~Poisson: no clumping of consecutive ids
  # tasks and hash arrays are unrelated: agreement at chance level (1/size)
  assert (s0 == s1).mean() < 5.0 / size
  assert (s0[0] == s0[1]).mean() < 5.0 / size
  # a collision in one array says nothing about the other: pairs colliding in both arrays occur
  # at the chance rate 1/size^2 (plus the 1000 pairs of an id with itself)
  both = ((s0[0][:, None] == s0[0][None, :1000]) & (s0[1][:, None] == s0[1][None, :1000])).sum()
  assert both - 1000 < 3 * len(ids) * 1000 / size**2


# --- update vs the reference ---------------------------------------------------------------------
def test_update_matches_sequential_reference():
  rng = np.random.default_rng(0)
  size, m, alpha = 512, 2, 0.1  # small table: in-batch collisions between distinct ids do happen
  state = frequency.init_freq(size, m)
  ref = RefYi(size, m, alpha)
  for t in range(1, 41):
    task = t % 2
    ids = rng.choice(300, size=32, replace=False).astype(np.int32)  # no duplicates in a batch
    state = _update(state, task, ids, t, alpha)
    ref.update(task, ids, t)
  np.testing.assert_allclose(state.last_step, ref.a)
  np.testing.assert_allclose(state.avg_gap, ref.b, rtol=1e-5, atol=1e-5)
  probe = np.arange(-3, 320, dtype=np.int32)
  for task in (0, 1):
    np.testing.assert_allclose(_log_q(state, task, probe), ref.log_q(task, probe),
                               rtol=1e-5, atol=1e-6)


def test_duplicates_count_once_and_invalid_entries_are_ignored():
  rng = np.random.default_rng(1)
  size, m, alpha = 256, 2, 0.05
  state = frequency.init_freq(size, m)
  ref = RefYi(size, m, alpha)
  for t in range(1, 20):
    ids = rng.choice(100, size=24, replace=False).astype(np.int32)
    state = _update(state, 0, ids, t, alpha)
    ref.update(0, ids, t)
  batch = np.array([5, 7, 5, 5, 9, 7, 11], np.int32)
  once = _update(state, 0, np.unique(batch), 20, alpha)
  dup = _update(state, 0, batch, 20, alpha)
  np.testing.assert_array_equal(dup.avg_gap, once.avg_gap)
  np.testing.assert_array_equal(dup.last_step, once.last_step)
  ref.update(0, batch, 20)  # the reference skips slots already updated at this step
  np.testing.assert_allclose(dup.avg_gap, ref.b, rtol=1e-5, atol=1e-6)
  # invalid entries change nothing, even when they share an id with a valid entry
  padded = np.array([5, 7, 5, 5, 9, 7, 11, 42, 43, 5], np.int32)
  valid = np.array([1, 0, 1, 1, 1, 1, 1, 0, 0, 0], bool)
  masked = _update(state, 0, padded, 20, alpha, valid)
  np.testing.assert_array_equal(masked.avg_gap, once.avg_gap)
  np.testing.assert_array_equal(masked.last_step, once.last_step)


def test_log_q_is_at_most_zero_and_unseen_is_zero():
  state = frequency.init_freq(1 << 12, 2)
  ids = np.arange(64, dtype=np.int32)
  np.testing.assert_array_equal(_log_q(state, 0, ids), 0.0)  # unseen: no correction
  for t in range(0, 30):  # id k is in the batches of steps with t % 64 >= k; B < 1 early on
    state = _update(state, 0, ids, t, 0.5, ids <= t % 64)
  lq = np.asarray(_log_q(state, 0, np.arange(200, dtype=np.int32)))
  assert np.isfinite(lq).all() and (lq <= 0).all() and (lq < 0).any()
  assert lq.dtype == np.float32


def _spearman(a, b):
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return np.corrcoef(ra, rb)[0, 1]


def test_zipf_stream_ranks_items_by_frequency():
  """On a Zipf stream, p_hat ranks items like their true probability of being in a batch."""
  n_items, batch, steps, alpha = 2000, 128, 3000, 0.02
  prob = 1.0 / np.arange(1, n_items + 1) ** 1.1
  prob /= prob.sum()
  rng = np.random.default_rng(2)
  stream = rng.choice(n_items, size=(steps, batch), p=prob).astype(np.int32)  # with duplicates

  def body(state, xs):
    t, ids = xs
    return frequency.update(state, 7, ids, t, alpha), None

  state, _ = jax.lax.scan(body, frequency.init_freq(1 << 14, 2),
                          (jnp.arange(1, steps + 1), jnp.asarray(stream)))
  in_batch = 1.0 - (1.0 - prob) ** batch  # what p_hat estimates
  est = np.exp(np.asarray(frequency.log_q(state, 7, np.arange(n_items, dtype=np.int32))))
  # items expected in >= 3 / alpha batches have had time to converge
  head = in_batch * steps >= 3 / alpha
  assert head.sum() > 100
  assert _spearman(est[head], in_batch[head]) > 0.95
  # and the values, not just the order, are right for the head
  top = np.arange(n_items) < 50
  assert np.median(np.abs(np.log(est[top] / in_batch[top]))) < 0.1
  # an id the task never saw (but another task might) has no estimate
  assert float(frequency.log_q(state, 8, np.int32(0))) == 0.0


# --- sharded over 8 devices == one device --------------------------------------------------------
_SHARDED_SCRIPT = textwrap.dedent("""
  import json, math
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from omnisage.train import frequency, losses

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  B, D, N, steps = 64, 16, 12, 4

  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  def make_batch(t):
    pos_ids = rng.integers(0, 40, size=B).astype(np.int32)  # many duplicates: accidental hits
    query_ids = rng.integers(0, 50, size=B).astype(np.int32)
    table = unit(np.random.default_rng(1).normal(size=(40, D)))
    return dict(q=unit(rng.normal(size=(B, D))), p=table[pos_ids], pos_ids=pos_ids,
                query_ids=query_ids, valid=rng.random(B) > 0.1,
                neg=unit(rng.normal(size=(N, D))),
                neg_ids=rng.integers(0, 40, size=N).astype(np.int32),
                neg_log_q=np.full(N, math.log(N / 40), np.float32))

  @jax.jit
  def step(freq, log_t, t, batch):
    freq = frequency.update(freq, 1, batch["pos_ids"], t, 0.1, valid=batch["valid"])
    pos_log_q = frequency.log_q(freq, 1, batch["pos_ids"])

    def loss_fn(q, p, log_t):
      return losses.nested_sampled_softmax_loss(
        q, p, log_temperature=log_t, temperature_max=math.log(100.0),
        query_ids=batch["query_ids"], pos_ids=batch["pos_ids"], pos_log_q=pos_log_q,
        neg=batch["neg"], neg_ids=batch["neg_ids"], neg_log_q=batch["neg_log_q"],
        valid=batch["valid"], nested_dims=(8,))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
      batch["q"], batch["p"], log_t)
    return freq, loss, grads, pos_log_q

  batches = [make_batch(t) for t in range(steps)]
  one = jax.devices()[0]
  shard = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  log_t = jnp.float32(math.log(1 / 0.07))
  f1 = jax.device_put(frequency.init_freq(1 << 10, 2), one)
  f8 = jax.device_put(frequency.init_freq(1 << 10, 2), repl)
  worst = 0.0
  for t, b in enumerate(batches):
    b1 = jax.device_put(b, one)
    b8 = {k: jax.device_put(v, repl if k.startswith("neg") else shard) for k, v in b.items()}
    assert len(b8["q"].sharding.device_set) == 8 and not b8["q"].sharding.is_fully_replicated
    f1, loss1, g1, lq1 = step(f1, jax.device_put(log_t, one), t + 1, b1)
    f8, loss8, g8, lq8 = step(f8, jax.device_put(log_t, repl), t + 1, b8)
    assert len(loss8.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(f8.avg_gap), np.asarray(f1.avg_gap))
    np.testing.assert_array_equal(np.asarray(f8.last_step), np.asarray(f1.last_step))
    np.testing.assert_allclose(lq8, lq1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    for a, c in zip(g8, g1):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
      worst = max(worst, float(np.abs(np.asarray(a) - np.asarray(c)).max()))
  print("SHARDED_OK", json.dumps({"max_grad_diff": worst, "loss": float(loss1)}))
""")


def test_sharded_update_and_loss_equal_one_device():
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=subprocess_env(8), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert "SHARDED_OK" in out.stdout, out.stdout


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
