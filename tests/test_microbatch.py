"""Tower microbatching (omnisage/train/microbatch.py): same outputs, loss and gradients, less
memory.

The row-order bookkeeping (a chunk takes rows from every device's block, padding dropped) is checked
against a NumPy reference in process; the train step with chunked towers is compared with the
unchunked one on 1 and 8 simulated devices in a child process (XLA_FLAGS must precede JAX).
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.train.microbatch import map_in_chunks
from tests.helpers import ROOT, subprocess_env


def _row_fn(w):
  # Row-wise and nonlinear, with a dict output: tanh(x @ w) and a per-row sum of the ids.
  return lambda x, ids: {"h": jnp.tanh(x @ w), "s": ids.sum(-1)}


@pytest.mark.parametrize("shards,chunk", [(1, 4), (4, 3), (4, 5), (2, 1), (3, 100)])
def test_outputs_and_gradients_match_numpy(shards, chunk):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 5)).astype(np.float32)
  ids = rng.integers(1, 9, size=(24, 3)).astype(np.int32)
  w = rng.normal(size=(5, 2)).astype(np.float32)
  out = map_in_chunks(_row_fn(w), (x, ids), chunk_rows=chunk, data_shards=shards)
  np.testing.assert_allclose(out["h"], np.tanh(x @ w), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["s"], ids.sum(-1))

  def loss(w, x):
    out = map_in_chunks(_row_fn(w), (x, ids), chunk_rows=chunk, data_shards=shards)
    return out["h"][:, 0].sum()
  gw, gx = jax.grad(loss, argnums=(0, 1))(w, x)
  d = 1 - np.tanh(x @ w)[:, 0] ** 2          # NumPy reference of d/dw, d/dx of sum_i tanh(x_i w_0)
  np.testing.assert_allclose(gw[:, 0], x.T @ d, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw[:, 1], 0, atol=0)
  np.testing.assert_allclose(gx, d[:, None] * w[:, 0][None], rtol=1e-5, atol=1e-5)


def test_chunks_run_one_at_a_time():
  # The body runs under lax.map: traced once with one chunk's rows (not the whole batch).
  seen = []

  def fn(x):
    seen.append(x.shape)
    return x * 2
  x = jnp.arange(32.0).reshape(16, 2)
  np.testing.assert_array_equal(map_in_chunks(fn, (x,), chunk_rows=2, data_shards=4), x * 2)
  assert seen and all(s == (8, 2) for s in seen), seen   # 4 devices x 2 rows per chunk
  seen.clear()
  map_in_chunks(fn, (x,), chunk_rows=0, data_shards=4)
  assert seen == [(16, 2)]


def test_mismatched_rows_are_an_error():
  with pytest.raises(ValueError, match="leading dimensions"):
    map_in_chunks(lambda a, b: a, (jnp.zeros((4, 2)), jnp.zeros((5, 2))), chunk_rows=2)


# The tiny config's train loss and gradients with tower_chunk_rows 3 (divides no task's per-device
# rows: padding is exercised) against tower_chunk_rows 0, on meshes 1x1 and 8x1; plus the compiled
# temp memory of the 8-device step with and without chunks (the point of chunking).
_CHILD = r"""
import functools, json, sys
import jax, numpy as np
from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage.feature_examples import ensure_feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.train import sharding
from omnisage.train.omnisearchsage import step as step_lib
from omnisage.train.omnisearchsage.state import create_train_state
from omnisage.data.omnisearchsage.schema import vocab_sizes_of

prepared = sys.argv[1]
config = get_config("tiny")
vocab = vocab_sizes_of(prepared)
ensure_feature_examples(config, prepared)   # the training input, as trainer.py builds it
batch = next(FeatureTrainData(config, prepared).iterator())
out, reference = {}, None
for data, chunk in [(1, 0), (1, 3), (8, 3), (8, 0)]:
  config.mesh.data, config.mesh.model, config.train.tower_chunk_rows = data, 1, chunk
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:data])
  state, statics = create_train_state(config, vocab, mesh)

  def loss_and_grads(statics, state, batch, config):
    def f(params):
      return step_lib.loss_only(statics, state.replace(params=params), batch, config=config)
    return jax.value_and_grad(f, has_aux=True)(state.params)

  fn = jax.jit(functools.partial(loss_and_grads, config=config.copy_and_resolve_references()))
  global_batch = sharding.shard_batch(mesh, batch)
  compiled = fn.lower(statics, state, global_batch).compile()
  (loss, _), grads = compiled(statics, state, global_batch)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  if reference is None:
    reference = (float(loss), leaves)
  excess = max(float(np.max(np.abs(a - r)) / (1e-5 + 1e-4 * np.max(np.abs(r))))
               for a, r in zip(leaves, reference[1]))
  out[f"{data}x1_chunk{chunk}"] = dict(
      loss=float(loss), worst_excess=excess,
      grad_norm=float(np.sqrt(sum((l ** 2).sum() for l in leaves))),
      temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
      while_loops=compiled.as_text().count(" while("))
print(json.dumps(out))
"""


def test_chunked_train_loss_and_gradients_on_1_and_8_devices(tiny_prepared):
  _, prepared = tiny_prepared
  result = subprocess.run([sys.executable, "-c", _CHILD, prepared], cwd=ROOT,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  plain = out["1x1_chunk0"]
  assert plain["grad_norm"] > 0 and plain["while_loops"] == 0, out
  for key in ("1x1_chunk3", "8x1_chunk3", "8x1_chunk0"):
    assert abs(out[key]["loss"] - plain["loss"]) <= 1e-5 * abs(plain["loss"]), (key, out)
    assert out[key]["worst_excess"] <= 1.0, (key, out)
  assert out["8x1_chunk3"]["while_loops"] > 0, out   # the chunks really are a loop
  # One chunk's activations instead of the whole batch's.
  assert out["8x1_chunk3"]["temp_bytes"] < out["8x1_chunk0"]["temp_bytes"], out
