"""PinText (SPEC §2): one word-embedding dictionary shared by all tasks; an entity is the AVERAGE
of its words' vectors.

Two halves with the same arithmetic:
  PinText          the trainable nnx module. The dictionary D [rows, d] is declared
                   P("model", None) (rows split over the `model` mesh axis, see
                   omnisage/train/sharding.py); `embed(ids)` averages the rows of the non-padding
                   ids (0 = padding, so out-of-vocabulary words, already dropped, cost nothing).
  TextEmbedder     the serving side: a bundle written by `launch.py export` (vocab.txt +
                   vectors.npy + manifest.json with sha256s) that embeds ANY text with NumPy only:
                   tokenise (omnisage.data.pintext.pairs.tokenize), drop unknown words, average.
An entity with no known word is the zero vector (cosine 0 against everything).

Usage:
  model = PinText(vocab_rows=1024, dim=64, init_scale=0.1, rngs=nnx.Rngs(0))
  vectors = model.embed(ids)                     # ids int32 [..., L] -> [..., d]
  embedder = TextEmbedder.load("runs/pintext/bundle")
  vectors = embedder.embed(["sofa with ottoman"])   # float32 [1, d]
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnisage.data.pintext.pairs import tokenize

BUNDLE_FORMAT = "pintext"
BUNDLE_VERSION = 1
VOCAB_FILE, VECTORS_FILE, MANIFEST = "vocab.txt", "vectors.npy", "manifest.json"


def average(table: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
  """Mean of table[ids] over the last axis of `ids`, ignoring id 0; zero when all ids are 0."""
  mask = (ids > 0).astype(table.dtype)[..., None]
  total = jnp.sum(jnp.take(table, ids, axis=0) * mask, axis=-2)
  return total / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)


class PinText(nnx.Module):

  def __init__(self, vocab_rows: int, dim: int, init_scale: float, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.normal(init_scale), ("model", None))
    self.table = nnx.Param(init(rngs.params(), (vocab_rows, dim), jnp.float32))

  def embed(self, ids: jnp.ndarray) -> jnp.ndarray:
    return average(self.table[...], ids)


def padded_rows(vocab_size: int, multiple: int = 64) -> int:
  """Dictionary rows: the vocabulary (id 0 included) rounded up so any `model` axis up to 64
  devices divides it (the extra rows are never looked up)."""
  return -(-vocab_size // multiple) * multiple


def sha256_of(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class TextEmbedder:
  """Averages word vectors of a vocabulary (a bundle, or any vocab + vectors)."""

  def __init__(self, vocab: list[str], vectors: np.ndarray, manifest: dict | None = None):
    self.index = {w: i for i, w in enumerate(vocab) if i}   # id 0 is padding, never a word
    self.vectors = np.asarray(vectors, np.float32)
    self.manifest = manifest or {}

  @classmethod
  def load(cls, path: str) -> "TextEmbedder":
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file} not found: not a PinText bundle (launch.py export)")
    with open(file) as f:
      manifest = json.load(f)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_VERSION:
      raise ValueError(f"{file}: format {manifest.get('format')!r} version "
                       f"{manifest.get('format_version')!r}, expected {BUNDLE_FORMAT!r} "
                       f"{BUNDLE_VERSION}")
    for name, digest in manifest["files"].items():
      if sha256_of(os.path.join(path, name)) != digest:
        raise ValueError(f"{os.path.join(path, name)}: sha256 differs from {file}")
    with open(os.path.join(path, VOCAB_FILE), encoding="utf-8") as f:
      vocab = f.read().splitlines()
    return cls(vocab, np.load(os.path.join(path, VECTORS_FILE)), manifest)

  def ids(self, text: str) -> list[int]:
    return [self.index[w] for w in tokenize(text) if w in self.index]

  def coverage(self, texts: list[str]) -> dict:
    """Share of the texts' word tokens in the vocabulary, and texts with no known word."""
    words = [tokenize(t) for t in texts]
    total = sum(len(w) for w in words)
    known = sum(w in self.index for ws in words for w in ws)
    empty = sum(not any(w in self.index for w in ws) for ws in words)
    return {"tokens": total, "known": known, "coverage": known / max(total, 1),
            "texts_without_known_word": empty}

  def embed(self, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.vectors.shape[1]), np.float32)
    for r, text in enumerate(texts):
      ids = self.ids(text)
      if ids:
        out[r] = self.vectors[ids].mean(axis=0)
    return out


def table_to_numpy(table) -> np.ndarray:
  """The dictionary gathered to host memory (all shards)."""
  return np.asarray(jax.device_get(table), np.float32)
