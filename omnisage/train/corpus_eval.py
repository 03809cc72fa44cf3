"""Embeddings of a trained checkpoint for full-corpus evaluation (the real-data benchmarks).

The in-training evaluator (evaluate.py) ranks each positive against a random sample, as the paper
does; the public benchmarks rank against the WHOLE corpus. This module restores the newest
checkpoint of a run and runs its towers over every entity of a kind and over arbitrary query
token matrices, in fixed-size padded chunks (one compilation per tower).

Usage:
  towers = TrainedTowers(config, workdir)
  products = towers.entities("products")            # [N, D] float32, row i = entity_index i
  queries = towers.queries(tokens)                   # tokens [n, L] int32 -> [n, D]
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnisage.train import trainer
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.evaluate import _entity_tower, _query_tower
from omnisage.train.sharding import DATA
from omnisage.train.state import abstract_state


class TrainedTowers:

  def __init__(self, config, workdir: str, batch_size: int = 512):
    mesh, state, statics, stores, _ = trainer.build(config, workdir)
    restored = Checkpointer(workdir, keep=config.train.keep_checkpoints).restore_latest(
        abstract_state(state))
    if restored is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    self.step, state, _ = restored
    self.params, self.statics, self.stores, self.mesh = state.params, statics, stores, mesh
    # Chunks are split over the data axis, so the chunk must be a multiple of its size.
    data = mesh.shape[DATA]
    self.batch = -(-batch_size // data) * data

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
      out.append(np.asarray(fn(self.statics, self.params, **chunk))[:min(self.batch, n - start)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def queries(self, tokens: np.ndarray) -> np.ndarray:
    return self._run(_query_tower, {"tokens": np.asarray(tokens, np.int32)})

  def entities(self, kind: str) -> np.ndarray:
    store = self.stores[kind]
    if kind == "queries":
      return self.queries(store.tokens)
    rows = np.arange(store.size)
    return self._run(_entity_tower, {"tokens": store.tokens,
                                     "fields": store.fields.astype(np.int32),
                                     "continuous": store.continuous(rows)})
