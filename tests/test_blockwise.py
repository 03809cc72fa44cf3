"""The blockwise logsumexp (losses.masked_logsumexp_blockwise) gives the dense loss and gradients.

In process: random cases with duplicate positives and queries, invalid rows, negatives that hit a
positive, fully masked rows, block sizes that do not divide B or N, nested dims; one case also
against the NumPy reference of tests/test_losses.py. Gradients are taken w.r.t. q, p, the random
negatives, the temperature and both log Q vectors (the column biases of the custom VJP).
In a child process with 8 simulated devices: the same on row-sharded inputs, the compiled memory
of both impls, and the train-step loss and gradients (q2pin + q2pinsage, nested dims, all
parameters) with loss.impl=blockwise on (1,1) and (8,1) meshes against dense on (1,1).
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.train import losses
from tests.helpers import ROOT, subprocess_env
from tests.test_losses import T_MAX, _unit, make_case, ref_grads, ref_loss

WRT = ("q", "p", "neg", "t", "pos_log_q", "neg_log_q")


def _loss_and_grads(c, **kw):
  """(loss, metrics, {name: gradient}) of sampled_softmax_loss, jitted, w.r.t. WRT."""
  def f(q, p, neg, t, pos_log_q, neg_log_q):
    return losses.sampled_softmax_loss(
      q, p, log_temperature=t, temperature_max=T_MAX, query_ids=c["query_ids"],
      pos_ids=c["pos_ids"], pos_log_q=pos_log_q, neg=neg, neg_ids=c["neg_ids"],
      neg_log_q=neg_log_q, valid=c["valid"], use_logq=c["use_logq"], **kw)
  args = [jnp.asarray(c[k], jnp.float32) for k in WRT]
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))(
    *args)
  return loss, metrics, dict(zip(WRT, grads))


def _assert_same(got, want):
  loss_b, metrics_b, grads_b = got
  loss_d, metrics_d, grads_d = want
  np.testing.assert_allclose(loss_b, loss_d, rtol=2e-6)
  for key in metrics_d:
    np.testing.assert_allclose(metrics_b[key], metrics_d[key], rtol=2e-6, atol=1e-7, err_msg=key)
  for name in WRT:
    scale = max(float(np.abs(grads_d[name]).max()), 1e-3)
    np.testing.assert_allclose(grads_b[name], grads_d[name], atol=1e-5 * scale, rtol=1e-5,
                               err_msg=name)


# (case options, block size): B = 13 rows, N = 7 negatives, so 3 and 5 divide neither and 64
# exceeds both (one block); 1 is the extreme of one column per block.
CASES = {
  "everything_block3": (dict(dup_pos=True, dup_query=True, invalid=True, neg_hits=True), 3),
  "everything_block5_no_logq": (dict(dup_pos=True, dup_query=True, neg_hits=True,
                                     use_logq=False), 5),
  "plain_block1": (dict(), 1),
  "invalid_block64": (dict(invalid=True, dup_pos=True), 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blockwise_equals_dense(name):
  options, block = CASES[name]
  c = make_case(seed=len(name), b=13, n=7, **options)
  _assert_same(_loss_and_grads(c, impl="blockwise", block_size=block),
               _loss_and_grads(c, impl="dense"))


def test_blockwise_vs_numpy_reference():
  """Independent of the dense impl: loss and q, p, t gradients of the SPEC reference."""
  c = make_case(seed=11, dup_pos=True, dup_query=True, invalid=True, neg_hits=True)
  loss, _, grads = _loss_and_grads(c, impl="blockwise", block_size=3)
  np.testing.assert_allclose(loss, ref_loss(c), rtol=1e-5, atol=1e-6)
  ref = ref_grads(c)
  for name in ("q", "p", "t"):
    np.testing.assert_allclose(grads[name], ref[name], atol=2e-5, rtol=1e-4, err_msg=name)


def test_fully_masked_rows():
  """Every row one query and every negative a hit: CE 0, finite zero gradients, as dense."""
  c = make_case(seed=2, b=6, n=4)
  c["query_ids"][:] = 7
  c["neg_ids"][:] = c["pos_ids"][0]
  c["pos_ids"][:] = c["pos_ids"][0]
  got = _loss_and_grads(c, impl="blockwise", block_size=4)
  assert float(got[0]) == 0.0
  assert all(np.isfinite(g).all() for g in got[2].values())
  _assert_same(got, _loss_and_grads(c, impl="dense"))


def test_nested_dims_blockwise():
  rng = np.random.default_rng(3)
  c = make_case(seed=3, b=10, d=16, n=6, dup_pos=True, neg_hits=True)
  c["q"] = _unit(rng.normal(size=(10, 16)))
  kw = dict(log_temperature=jnp.float32(c["t"]), temperature_max=T_MAX, query_ids=c["query_ids"],
            pos_ids=c["pos_ids"], pos_log_q=c["pos_log_q"], neg_ids=c["neg_ids"],
            neg_log_q=c["neg_log_q"], nested_dims=(4, 8), nested_weight=0.05)

  def f(q, p, neg, impl):
    return losses.nested_sampled_softmax_loss(q, p, neg=neg, impl=impl, block_size=4, **kw)
  out = {impl: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True),
                       static_argnames="impl")(c["q"], c["p"], c["neg"], impl=impl)
         for impl in ("dense", "blockwise")}
  (loss_d, metrics_d), grads_d = out["dense"]
  (loss_b, metrics_b), grads_b = out["blockwise"]
  np.testing.assert_allclose(loss_b, loss_d, rtol=2e-6)
  np.testing.assert_allclose(metrics_b["loss_d4"], metrics_d["loss_d4"], rtol=2e-6)
  for a, b in zip(grads_b, grads_d):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()))


def test_bad_impl_and_block_size():
  c = make_case()
  with pytest.raises(ValueError, match="loss.impl"):
    _loss_and_grads(c, impl="chunky")
  with pytest.raises(ValueError, match="block_size"):
    _loss_and_grads(c, impl="blockwise", block_size=0)


# Row-sharded random inputs (B = 512, 4 negatives per pair) and the tiny train step, on 8 devices.
_CHILD = r"""
import json, sys, time
start = time.time()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage.feature_examples import ensure_feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.train import losses, sharding
from omnisage.train.omnisearchsage import step as step_lib
from omnisage.train.omnisearchsage.state import create_train_state
from omnisage.data.omnisearchsage.schema import vocab_sizes_of

out = {}
b, d = 512, 16
rng = np.random.default_rng(0)
unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
floats = [unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d))),
          unit(rng.normal(size=(4 * b, d))), np.float32(3.0),
          rng.uniform(-6, 0, b).astype(np.float32), rng.uniform(-9, -2, 4 * b).astype(np.float32)]
ids = [rng.integers(0, b, n).astype(np.int32) for n in (b, b, 4 * b)]  # duplicates: masks matter

def loss(q, p, neg, t, lq, nlq, qid, pid, nid, impl):
  return losses.sampled_softmax_loss(q, p, log_temperature=t, temperature_max=4.6, query_ids=qid,
      pos_ids=pid, pos_log_q=lq, neg=neg, neg_ids=nid, neg_log_q=nlq, impl=impl,
      block_size=100)[0]

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, P("data"))
sharded = [x if np.ndim(x) == 0 else jax.device_put(x, rows) for x in floats + ids]
fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))), static_argnames="impl")
ref = None
for impl in ("dense", "blockwise"):
  compiled = fn.lower(*sharded, impl=impl).compile()
  value, grads = compiled(*sharded)
  if ref is None:
    ref = fn(*floats, *ids, impl="dense")   # one device, unsharded
  excess = max(float(np.abs(np.asarray(a) - np.asarray(r)).max() / (1e-5 * np.abs(r).max()))
               for a, r in zip(grads, ref[1]))
  out[f"random_{impl}"] = dict(loss=float(value), ref_loss=float(ref[0]), worst_excess=excess,
                               temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
  print(impl, time.time() - start, file=sys.stderr, flush=True)

prepared = sys.argv[1]
config = get_config("tiny")
config.loss.block_size = 24   # divides neither the q2pin batch (64) nor the negatives (32)
config.loss.nested_dims = (16, 64)
vocab = vocab_sizes_of(prepared)
# One task (q2pin and its compatibility task q2pinsage): the other tasks call the same loss, and
# every task adds tower graphs to compile (minutes on a loaded 2-core box).
ensure_feature_examples(config, prepared)   # the training input, as trainer.py builds it
batch = {"q2pin": next(FeatureTrainData(config, prepared).iterator())["q2pin"]}
reference = None
for impl, data in [("dense", 1), ("blockwise", 1), ("blockwise", 8)]:
  config.loss.impl, config.mesh.data, config.mesh.model = impl, data, 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:data])
  state, statics = create_train_state(config, vocab, mesh)

  @jax.jit
  def loss_and_grads(statics, state, batch):
    def f(params):
      return step_lib.loss_only(statics, state.replace(params=params), batch, config=config)
    return jax.value_and_grad(f, has_aux=True)(state.params)

  (value, _), grads = loss_and_grads(statics, state, sharding.shard_batch(mesh, batch))
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  if reference is None:
    reference = (float(value), leaves)
  excess = max(float(np.max(np.abs(a - r)) / (1e-5 + 1e-4 * np.max(np.abs(r))))
               for a, r in zip(leaves, reference[1]))
  out[f"step_{impl}_{data}x1"] = dict(loss=float(value), worst_excess=excess,
                                      grad_norm=float(np.sqrt(sum((l ** 2).sum() for l in leaves))))
  print(impl, data, time.time() - start, file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def test_blockwise_sharded_and_train_step(tiny_prepared):
  _, prepared = tiny_prepared
  result = subprocess.run([sys.executable, "-c", _CHILD, prepared], cwd=ROOT,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for impl in ("dense", "blockwise"):
    r = out[f"random_{impl}"]
    assert abs(r["loss"] - r["ref_loss"]) <= 2e-6 * abs(r["ref_loss"]), out
    assert r["worst_excess"] <= 1.0, out   # every gradient within 1e-5 of its largest entry
  # Sharded over 8 rows-blocks, dense still holds [B/8, 5B] logits and softmax weights per device;
  # blockwise holds [B/8, 100] blocks plus the gathered candidates.
  assert out["random_blockwise"]["temp_bytes"] * 1.5 < out["random_dense"]["temp_bytes"], out
  dense = out["step_dense_1x1"]
  assert dense["grad_norm"] > 0
  for key in ("step_blockwise_1x1", "step_blockwise_8x1"):
    assert abs(out[key]["loss"] - dense["loss"]) <= 1e-5 * abs(dense["loss"]), (key, out)
    assert out[key]["worst_excess"] <= 1.0, (key, out)
