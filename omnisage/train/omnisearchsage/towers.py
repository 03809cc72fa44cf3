"""Embeddings of a trained checkpoint for full-corpus evaluation (the real-data benchmarks).

The in-training evaluator (evaluate.py) ranks each positive against a random sample, as the paper
does; the public benchmarks rank against the WHOLE corpus. This module restores the newest
checkpoint of a run and runs its towers over every entity of a kind and over arbitrary query
token matrices, in fixed-size padded chunks (one compilation per tower).

Usage:
  towers = TrainedTowers(config, workdir)
  products = towers.entities("products")            # [N, D] float32, row i = entity_index i
  queries = towers.queries(tokens)                   # tokens [n, L] int32 -> [n, D]
  queries = towers.query_texts(["angle bracket"])    # raw text, tokenised as prepare does
"""

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnisage.data import text
from omnisage.data.omnisearchsage.query_input import QueryEncoder, lexical_len
from omnisage.data.tokenizer import WordPieceTokenizer
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.evaluators.recall import entity_tower_fn, query_tower_fn, to_host
from omnisage.train.omnisearchsage import trainer
from omnisage.train.sharding import DATA
from omnisage.train.state import abstract_state


class TrainedTowers:

  def __init__(self, config, workdir: str, batch_size: int = 512, step: int | None = None):
    mesh, state, statics, stores, self.prepared = trainer.build(config, workdir)
    self.config = config
    self._abstract = abstract_state(state)
    self.checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    self.statics, self.stores, self.mesh = statics, stores, mesh
    self.restore(step)
    # Chunks are split over the data axis, so the chunk must be a multiple of its size.
    data = mesh.shape[DATA]
    self.batch = -(-batch_size // data) * data

  def restore(self, step: int | None = None) -> int:
    """Loads the parameters of checkpoint `step` (None: the newest that restores)."""
    if step is None:
      restored = self.checkpointer.restore_latest(self._abstract)
      if restored is None:
        raise FileNotFoundError(f"no checkpoint under {self.checkpointer.directory}")
      self.step, state, _ = restored
    else:
      state, _ = self.checkpointer.restore(step, self._abstract)
      self.step = step
    self.params = state.params
    return self.step

  def steps(self) -> list[int]:
    """Steps of the checkpoints kept on disk (candidates for model selection)."""
    return self.checkpointer.steps()

  def _run(self, fn, arrays: dict) -> np.ndarray:
    n = len(next(iter(arrays.values())))
    sharding = NamedSharding(self.mesh, P(DATA))
    out = []
    for start in range(0, n, self.batch):
      chunk = {}
      for key, value in arrays.items():
        part = value[start:start + self.batch]
        pad = self.batch - len(part)
        if pad:
          part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        chunk[key] = jax.device_put(part, sharding)
      out.append(to_host(fn(self.statics, self.params, **chunk))[:min(self.batch, n - start)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def queries(self, tokens: np.ndarray) -> np.ndarray:
    return self._run(query_tower_fn, {"tokens": np.asarray(tokens, np.int32)})

  def query_texts(self, texts: list[str]) -> np.ndarray:
    """Raw query texts -> embeddings, normalised and tokenised exactly as `prepare` does (the
    pure-Python WordPiece equals prepare's tensorflow-text one; the lexical path's n-grams use
    the prepared vocabulary), cropped to the batch length."""
    d = self.config.data
    tokenizer = WordPieceTokenizer(os.path.join(self.prepared, "query_vocab.txt"),
                                   d.query_lower_case, d.query_max_len)
    width = lexical_len(self.config)
    vocab = text.NgramVocab.load(os.path.join(self.prepared, "ngram_vocab")) if width else None
    encoder = QueryEncoder(tokenizer, vocab, width)
    return self.queries(encoder.encode_batch([text.normalize(t) for t in texts],
                                             d.batch_query_len))

  def entities(self, kind: str) -> np.ndarray:
    store = self.stores[kind]
    if kind == "queries":
      return self.queries(store.tokens)
    rows = np.arange(store.size)
    return self._run(entity_tower_fn, {"tokens": store.tokens,
                                     "fields": store.fields.astype(np.int32),
                                     "continuous": store.continuous(rows)})
