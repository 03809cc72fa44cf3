"""omnisage.train.losses vs a NumPy reference written from SPEC §1, one row at a time.

The reference builds each row's softmax the way SPEC states it: the in-batch candidates of row i are
the positives of all valid rows j (the diagonal is the positive), minus the columns j != i with the
same positive or the same query; the random candidates are [positive, negatives other than the
positive]. Every candidate logit is s - log Q. Gradients are central differences of the reference in
float64, so nothing here shares code with the implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.train import losses

T_MAX = math.log(100.0)


# --- reference --------------------------------------------------------------------------------
def _lse(xs):
  xs = np.asarray(xs, np.float64)
  m = xs.max()
  return m + np.log(np.exp(xs - m).sum())


def ref_rows(c):
  """Per-row (ce_inbatch, ce_random, correct) of case dict `c`; None for invalid rows."""
  # everything in float64 (NumPy 2 keeps float32 scalars float32 when mixed with Python floats)
  f64 = lambda x: None if x is None else np.asarray(x, np.float64)
  q, p, neg = f64(c["q"]), f64(c["p"]), f64(c["neg"])
  scale = math.exp(min(float(c["t"]), T_MAX))
  b = q.shape[0]
  valid = c["valid"] if c["valid"] is not None else np.ones(b, bool)
  lq = f64(c["pos_log_q"]) if c["use_logq"] else np.zeros(b)
  out = []
  for i in range(b):
    if not valid[i]:
      out.append(None)
      continue
    logits = []  # (column, logit)
    for j in range(b):
      if not valid[j]:
        continue
      if j != i and (c["pos_ids"][j] == c["pos_ids"][i] or c["query_ids"][j] == c["query_ids"][i]):
        continue
      logits.append((j, scale * float(q[i] @ p[j]) - lq[j]))
    if c.get("hard") is not None:   # the row's own hard negatives, no logQ
      for k in range(c["hard"].shape[1]):
        if c["hard_valid"][i, k] and c["hard_ids"][i, k] != c["pos_ids"][i]:
          logits.append((("hard", k), scale * float(q[i] @ f64(c["hard"])[i, k])))
    pos = scale * float(q[i] @ p[i]) - lq[i]
    ce_in = _lse([v for _, v in logits]) - pos
    correct = max(logits, key=lambda jv: jv[1])[0] == i
    ce_rnd = 0.0
    if neg is not None:
      nlq = f64(c["neg_log_q"]) if c["use_logq"] else np.zeros(len(neg))
      rnd = [pos]
      for k in range(len(neg)):
        if c["neg_ids"][k] != c["pos_ids"][i]:
          rnd.append(scale * float(q[i] @ neg[k]) - nlq[k])
      ce_rnd = _lse(rnd) - pos
    out.append((ce_in, ce_rnd, correct))
  return out


def ref_loss(c):
  rows = [r for r in ref_rows(c) if r is not None]
  n = max(len(rows), 1)
  return sum(r[0] + r[1] for r in rows) / n


def ref_grads(c, eps=1e-6):
  """Central differences of ref_loss w.r.t. q, p and t (float64)."""
  grads = {}
  for name in ("q", "p"):
    g = np.zeros_like(c[name], dtype=np.float64)
    for idx in np.ndindex(c[name].shape):
      hi, lo = dict(c), dict(c)
      hi[name] = c[name].astype(np.float64).copy()
      lo[name] = c[name].astype(np.float64).copy()
      hi[name][idx] += eps
      lo[name][idx] -= eps
      g[idx] = (ref_loss(hi) - ref_loss(lo)) / (2 * eps)
    grads[name] = g
  grads["t"] = (ref_loss(dict(c, t=c["t"] + eps)) - ref_loss(dict(c, t=c["t"] - eps))) / (2 * eps)
  return grads


# --- cases --------------------------------------------------------------------------------------
def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_case(seed=0, b=8, d=6, n=5, *, dup_pos=False, dup_query=False, invalid=False,
              neg_hits=False, negatives=True, use_logq=True, t=math.log(1 / 0.07), hard=0):
  rng = np.random.default_rng(seed)
  q = _unit(rng.normal(size=(b, d)))
  p = _unit(rng.normal(size=(b, d)))
  query_ids = np.arange(b, dtype=np.int32) + 100
  pos_ids = np.arange(b, dtype=np.int32) + 1000
  if dup_pos:  # rows 0, 3 and 5 share a positive entity (same vector, as it would be)
    pos_ids[[3, 5]] = pos_ids[0]
    p[[3, 5]] = p[0]
  if dup_query:  # rows 1, 2 are the same query with two different positives
    query_ids[2] = query_ids[1]
    q[2] = q[1]
  c = dict(q=q, p=p, t=t, query_ids=query_ids, pos_ids=pos_ids, use_logq=use_logq,
           pos_log_q=rng.uniform(-6, 0, size=b).astype(np.float32), valid=None,
           neg=None, neg_ids=None, neg_log_q=None)
  if dup_pos:
    c["pos_log_q"][[3, 5]] = c["pos_log_q"][0]
  if invalid:
    c["valid"] = np.ones(b, bool)
    c["valid"][[2, 6]] = False
  if negatives:
    c["neg"] = _unit(rng.normal(size=(n, d)))
    c["neg_ids"] = np.arange(n, dtype=np.int32) + 5000
    c["neg_log_q"] = rng.uniform(-8, -2, size=n).astype(np.float32)
    if neg_hits:  # negatives 0 and 3 are the positives of rows 4 and 1
      c["neg_ids"][0], c["neg_ids"][3] = pos_ids[4], pos_ids[1]
      c["neg"][0], c["neg"][3] = p[4], p[1]
  if hard:   # k hard negatives per row: row 0's second is its own positive, row 1 has padding
    c["hard"] = _unit(rng.normal(size=(b, hard, d)))
    c["hard_ids"] = (np.arange(b * hard, dtype=np.int32) + 9000).reshape(b, hard)
    c["hard_valid"] = np.ones((b, hard), bool)
    c["hard_ids"][0, 1], c["hard"][0, 1] = pos_ids[0], p[0]
    c["hard_valid"][1, 1:] = False
    c["hard"][1, 1:] = 0.0
    # A close hard negative: row 2's first is near its positive (a high logit that matters).
    c["hard"][2, 0] = _unit(p[2] + 0.1 * rng.normal(size=d))
  return c


def impl_loss(c, q=None, p=None, t=None, **kw):
  return losses.sampled_softmax_loss(
    c["q"] if q is None else q, c["p"] if p is None else p,
    log_temperature=jnp.float32(c["t"]) if t is None else t, temperature_max=T_MAX,
    query_ids=c["query_ids"], pos_ids=c["pos_ids"], pos_log_q=c["pos_log_q"],
    neg=c["neg"], neg_ids=c["neg_ids"], neg_log_q=c["neg_log_q"], valid=c["valid"],
    hard=c.get("hard"), hard_ids=c.get("hard_ids"), hard_valid=c.get("hard_valid"),
    use_logq=c["use_logq"], **kw)


def impl_grads(c, **kw):
  f = lambda q, p, t: impl_loss(c, q, p, t, **kw)[0]
  return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(jnp.asarray(c["q"]), jnp.asarray(c["p"]),
                                                  jnp.float32(c["t"]))


CASES = {
  "plain": dict(),
  "accidental_hits": dict(dup_pos=True),
  "same_query": dict(dup_query=True),
  "invalid_rows": dict(invalid=True, dup_pos=True),
  "negatives_hit_positive": dict(neg_hits=True, dup_pos=True),
  "no_logq": dict(dup_pos=True, dup_query=True, neg_hits=True, use_logq=False),
  "no_negatives": dict(negatives=False, dup_query=True),
  "everything": dict(dup_pos=True, dup_query=True, invalid=True, neg_hits=True),
  "hard_negatives": dict(hard=3, dup_query=True),
  "hard_negatives_everything": dict(hard=2, dup_pos=True, dup_query=True, invalid=True,
                                    neg_hits=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_grads_vs_reference(name):
  c = make_case(seed=len(name), **CASES[name])
  loss, metrics = impl_loss(c)
  rows = [r for r in ref_rows(c) if r is not None]
  np.testing.assert_allclose(loss, ref_loss(c), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss_inbatch"], np.mean([r[0] for r in rows]), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_random"], np.mean([r[1] for r in rows]), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(metrics["accuracy_inbatch"], np.mean([r[2] for r in rows]))
  assert metrics["num_valid"] == len(rows)
  gq, gp, gt = impl_grads(c)
  ref = ref_grads(c)
  np.testing.assert_allclose(gq, ref["q"], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(gp, ref["p"], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(gt, ref["t"], atol=2e-5, rtol=1e-4)


def test_hard_negatives_raise_the_loss_and_skip_logq():
  """A close hard negative makes the row harder; logQ does not touch hard-negative logits."""
  base = make_case(seed=3, dup_query=True)
  hard = make_case(seed=3, dup_query=True, hard=3)
  assert float(impl_loss(hard)[0]) > float(impl_loss(base)[0])
  shifted = dict(hard, pos_log_q=hard["pos_log_q"] - 1.0)   # every in-batch column moves
  no_hard_shift = ref_loss(dict(shifted, hard=None)) - ref_loss(dict(base, pos_log_q=shifted[
      "pos_log_q"]))
  assert abs(no_hard_shift) < 1e-9   # (sanity: the reference with hard=None is the base case)
  np.testing.assert_allclose(impl_loss(shifted)[0], ref_loss(shifted), rtol=1e-5)


def test_masks_change_the_loss():
  """Guards the reference itself: the duplicate cases really exercise the masks."""
  c = make_case(dup_pos=True, dup_query=True, neg_hits=True)
  unmasked = dict(c, pos_ids=np.arange(8, dtype=np.int32) + 1000,
                  query_ids=np.arange(8, dtype=np.int32) + 100,
                  neg_ids=np.arange(5, dtype=np.int32) + 5000)
  assert abs(ref_loss(c) - ref_loss(unmasked)) > 1e-2
  assert abs(float(impl_loss(c)[0]) - float(impl_loss(unmasked)[0])) > 1e-2


def test_invalid_rows_are_inert_even_with_nan():
  """Invalid rows: no loss, no negatives, zero (finite) gradients, whatever their positive holds."""
  c = make_case(invalid=True, dup_pos=True)
  garbage = dict(c, p=c["p"].copy(), pos_log_q=c["pos_log_q"].copy())
  garbage["p"][[2, 6]] = np.nan
  garbage["pos_log_q"][[2, 6]] = -np.inf
  np.testing.assert_allclose(impl_loss(garbage)[0], ref_loss(c), rtol=1e-5)
  gq, gp, gt = impl_grads(garbage)
  assert np.isfinite(gq).all() and np.isfinite(gp).all() and np.isfinite(gt)
  np.testing.assert_array_equal(np.asarray(gp)[[2, 6]], 0.0)
  np.testing.assert_allclose(gp, ref_grads(c)["p"], atol=2e-5, rtol=1e-4)
  none_valid = dict(c, valid=np.zeros(8, bool))
  loss, metrics = impl_loss(none_valid)
  assert float(loss) == 0.0 and float(metrics["num_valid"]) == 0.0


# --- the sign of logQ ---------------------------------------------------------------------------
def _rows(c):
  return losses.sampled_softmax_rows(
    c["q"], c["p"], log_temperature=jnp.float32(c["t"]), temperature_max=T_MAX,
    query_ids=c["query_ids"], pos_ids=c["pos_ids"], pos_log_q=c["pos_log_q"], neg=c["neg"],
    neg_ids=c["neg_ids"], neg_log_q=c["neg_log_q"], valid=c["valid"], use_logq=c["use_logq"])


def test_logq_sign_by_hand():
  """Two rows, numbers worked out by hand: logit_01 = s_01 - log Q(y_1) (SUBTRACTED)."""
  q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  p = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
  c = dict(q=q, p=p, t=0.0, query_ids=np.array([0, 1]), pos_ids=np.array([10, 11]),
           pos_log_q=np.log(np.array([0.5, 0.01], np.float32)), use_logq=True, valid=None,
           neg=None, neg_ids=None, neg_log_q=None)
  # row 0: positive 1 - log .5; negative y_1 (rare, Q = .01): 0.6 - log .01 = 0.6 + 4.605
  want = math.log1p(math.exp((0.6 - math.log(0.01)) - (1.0 - math.log(0.5))))
  ce = _rows(c)["ce_inbatch"]
  np.testing.assert_allclose(ce[0], want, rtol=1e-6)
  np.testing.assert_allclose(ce[0], ref_rows(c)[0][0], rtol=1e-6)
  # the wrong sign (adding log Q) would give a much smaller loss for this row
  wrong = math.log1p(math.exp((0.6 + math.log(0.01)) - (1.0 + math.log(0.5))))
  assert want > 3.0 > 0.1 > wrong


def test_popular_negative_is_penalised_less():
  """Raising log Q(y_j) (y_j more popular) lowers every other row's in-batch loss."""
  c = make_case(seed=3, dup_query=True, t=0.0)  # scale 1: every column carries visible weight
  j = 4
  base = _rows(c)["ce_inbatch"]
  popular = dict(c, pos_log_q=c["pos_log_q"].copy())
  popular["pos_log_q"][j] += 1.5
  more = _rows(popular)["ce_inbatch"]
  others = np.arange(8) != j
  assert (np.asarray(more)[others] < np.asarray(base)[others]).all()
  for r, got in zip(ref_rows(popular), more):
    np.testing.assert_allclose(got, r[0], rtol=1e-5)
  # and the derivative of row i's loss w.r.t. log Q(y_j) is minus the softmax weight of column j
  grad = jax.grad(lambda lq: _rows(dict(c, pos_log_q=lq))["ce_inbatch"][0])(
    jnp.asarray(c["pos_log_q"]))
  assert float(grad[j]) < 0.0


def test_popular_random_negative_is_penalised_less():
  c = make_case(seed=4)
  base = _rows(c)["ce_random"]
  popular = dict(c, neg_log_q=c["neg_log_q"] + np.float32(2.0))
  assert (np.asarray(_rows(popular)["ce_random"]) < np.asarray(base)).all()


# --- temperature --------------------------------------------------------------------------------
def test_temperature_clip():
  c = make_case(seed=5, t=T_MAX + 0.5)
  _, _, gt = impl_grads(c)
  assert float(gt) == 0.0
  np.testing.assert_allclose(impl_loss(c)[0], impl_loss(dict(c, t=T_MAX))[0], rtol=1e-6)
  np.testing.assert_allclose(impl_loss(c)[1]["logit_scale"], 100.0, rtol=1e-5)
  below = make_case(seed=5, t=T_MAX - 0.5)
  _, _, gt = impl_grads(below)
  assert abs(float(gt)) > 1e-3
  np.testing.assert_allclose(gt, ref_grads(below)["t"], atol=2e-5, rtol=1e-4)


# --- nested dims ----------------------------------------------------------------------------------
def test_nested_loss_is_weighted_sum_of_prefix_losses():
  rng = np.random.default_rng(7)
  c = make_case(seed=7, d=16, dup_pos=True, neg_hits=True)
  c["q"] = _unit(rng.normal(size=(8, 16)))  # fresh full-dim vectors; the ids keep their meaning
  def prefix(d):
    return dict(c, q=_unit(c["q"][:, :d]), p=_unit(c["p"][:, :d]), neg=_unit(c["neg"][:, :d]))
  want = ref_loss(c) + 0.05 * ref_loss(prefix(4)) + 0.05 * ref_loss(prefix(8))
  kw = dict(log_temperature=jnp.float32(c["t"]), temperature_max=T_MAX, query_ids=c["query_ids"],
            pos_ids=c["pos_ids"], pos_log_q=c["pos_log_q"], neg_ids=c["neg_ids"],
            neg_log_q=c["neg_log_q"])
  loss, metrics = losses.nested_sampled_softmax_loss(
    c["q"], c["p"], neg=c["neg"], nested_dims=(4, 8), nested_weight=0.05, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_d4"], ref_loss(prefix(4)), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_d16"], ref_loss(c), rtol=1e-5)
  # the dict form, with a dim above D that is skipped (official MultiDimSoftmaxCorrectionLossV2)
  loss2, _ = losses.nested_sampled_softmax_loss(
    c["q"], c["p"], neg=c["neg"], dim_weights={4: 0.05, 8: 0.05, 16: 1.0, 32: 1.0}, **kw)
  np.testing.assert_allclose(loss2, want, rtol=1e-5)
  # no nested dims: exactly the plain loss
  plain, _ = losses.nested_sampled_softmax_loss(c["q"], c["p"], neg=c["neg"], **kw)
  np.testing.assert_allclose(plain, ref_loss(c), rtol=1e-5)
  assert losses.nested_dim_weights(512, (16, 256), (0.05, 1.0)) == {512: 1.0, 16: 0.05, 256: 1.0}


# --- the logsumexp primitive is swappable -------------------------------------------------------
def _chunked_lse(q, cands, *, scale, col_bias, mask_fn, block_size=None, chunk=3):
  """A blockwise stand-in: online logsumexp over column chunks (what a later impl would do)."""
  lse = jnp.full((q.shape[0],), -jnp.inf)
  mx = jnp.full((q.shape[0],), -jnp.inf)
  rows = jnp.arange(q.shape[0])
  for start in range(0, cands.shape[0], chunk):
    cols = jnp.arange(start, min(start + chunk, cands.shape[0]))
    logits = scale * q @ cands[cols].T - col_bias[cols][None, :]
    logits = jnp.where(mask_fn(rows, cols), losses.MASKED_LOGIT, logits)
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=1))
    mx = jnp.maximum(mx, logits.max(axis=1))
  return lse, mx


def test_impl_is_swappable(monkeypatch):
  monkeypatch.setitem(losses.LSE_IMPLS, "chunked", _chunked_lse)
  c = make_case(seed=9, dup_pos=True, dup_query=True, invalid=True, neg_hits=True)
  dense, dense_m = jax.jit(lambda: impl_loss(c))()
  chunked, chunked_m = jax.jit(lambda: impl_loss(c, impl="chunked"))()
  np.testing.assert_allclose(chunked, dense, rtol=1e-6)
  np.testing.assert_allclose(chunked_m["accuracy_inbatch"], dense_m["accuracy_inbatch"])
  # float32 rounding: dense's hand-written VJP forms the softmax weights as exp(logit - lse), the
  # chunked impl's autodiff as exp(logit - max) / sum.
  for a, b in zip(impl_grads(c, impl="chunked"), impl_grads(c)):
    np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-5)
