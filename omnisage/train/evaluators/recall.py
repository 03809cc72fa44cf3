"""Recall@10 per task by the paper's protocol, computed on the device.

SPEC §1 "Evaluation": for each held-out (query, engaged entity) pair, rank the entity against an
index of uniformly random corpus entities: rank = 1 + #index items scoring >= the positive;
Recall@10 = mean(rank <= 10). The positive itself is removed from the index if sampled into it.
Compatibility tasks rank the frozen legacy vector of the positive among the legacy vectors of random
entities that have one, scored with the query vector's first compat_dim dims (the old index).

Eval pairs come from the eval split (after the train/eval time gap); the index and the pair subset
are fixed by the seed, so every evaluation of a run (untrained, periodic, final) uses the same ones.

Usage: `ev = Evaluator(config, prepared=prepared_dir, stores=stores, mesh=mesh)`;
`ev.run(statics, params)` -> {"recall@10/<task>": r}, `ev.evaluate(...)` -> {task: r}.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.pipeline import packed_queries, read_pairs
from omnisage.models import compat
from omnisage.train.sharding import DATA

K = 10


@jax.jit
def ranks_against_index(q, pos, index, pos_ids, index_ids):
  """rank = 1 + #index items scoring >= the positive (ties count against the model).

  A non-finite score ranks last: a positive scored NaN or infinite gets rank len(index) + 1, and a
  non-finite index item beats no positive (NaN compares false, which would otherwise make every
  positive rank 1)."""
  pos_score = jnp.sum(q * pos, axis=-1)
  scores = q @ index.T
  scores = jnp.where(index_ids[None, :] == pos_ids[:, None], -jnp.inf, scores)
  scores = jnp.where(jnp.isfinite(scores), scores, -jnp.inf)
  ranks = 1 + jnp.sum(scores >= pos_score[:, None], axis=-1)
  return jnp.where(jnp.isfinite(pos_score), ranks, index.shape[0] + 1)


def require_finite(name: str, x: np.ndarray) -> np.ndarray:
  """`x`, or a ValueError saying how many rows of the `name` embeddings are NaN or infinite
  (evaluating such a model would report numbers that mean nothing)."""
  bad = ~np.isfinite(np.asarray(x)).reshape(len(x), -1).all(axis=1)
  if bad.any():
    raise ValueError(f"evaluation: {int(bad.sum())} of {len(x)} {name} embeddings are NaN or "
                     "infinite; the model is broken (a diverged run or a damaged checkpoint)")
  return x


def to_host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on this host; with several processes each holds only its rows."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


class TowerRunner:
  """Runs a jitted tower over host arrays in fixed-size chunks split over the data axis (padded:
  one compilation per shape), and gathers entity inputs from the stores."""

  def __init__(self, stores: dict, mesh, batch: int):
    self.stores, self.mesh, self.batch = stores, mesh, int(batch)

  def run(self, fn, arrays: dict) -> np.ndarray:
    n = len(next(iter(arrays.values())))
    sharding = NamedSharding(self.mesh, P(DATA))
    out = []
    for start, end in _chunks(n, self.batch):
      chunk = {}
      for key, value in arrays.items():
        part = value[start:end]
        pad = self.batch - len(part)
        if pad:
          part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        chunk[key] = jax.device_put(part, sharding)
      out.append(to_host(fn(**chunk))[: end - start])
    return np.concatenate(out)

  def entity_inputs(self, kind: str, ids: np.ndarray) -> dict:
    features = self.stores[kind].gather(ids, "e")
    if kind == "queries":
      return {"tokens": features["e_tokens"]}
    return {"tokens": features["e_tokens"], "fields": features["e_fields"],
            "continuous": features["e_continuous"]}

  def embed(self, statics, params, kind: str, ids: np.ndarray) -> np.ndarray:
    """Vectors of entities `ids` of `kind` (queries go through the query tower)."""
    fn = query_tower_fn if kind == "queries" else entity_tower_fn
    return self.run(functools.partial(fn, statics, params), self.entity_inputs(kind, ids))


class Evaluator:
  """Recall@10 per task (module docstring); `run` names the metrics "recall@10/<task>"."""

  def __init__(self, config, *, prepared: str, stores: dict, mesh, **_):
    prepared_dir = prepared
    self.config = config
    self.stores = stores
    self.mesh = mesh
    self.batch = int(config.eval.batch_size)
    self.towers = TowerRunner(stores, mesh, self.batch)
    rng = np.random.default_rng(config.seed + 99)
    self.pairs, self.index_ids = {}, {}
    for task, kind in schema.TASK_ENTITY.items():
      if config.tasks[task] <= 0:
        continue
      try:
        self.pairs[task] = read_pairs(prepared_dir, "eval", task, config.eval.max_pairs,
                                      config.seed, config.data.batch_query_len,
                                      packed_queries(stores, config.data))
      except ValueError:  # the eval window has no pair of this task: nothing to report for it
        continue
      n = stores[kind].size
      self.index_ids[task] = np.sort(rng.choice(n, min(config.eval.index_size, n), replace=False))
    if config.tasks.compat:
      for compat_task, parent in schema.COMPAT_TASKS.items():
        if parent not in self.pairs:
          continue
        store = stores[schema.TASK_ENTITY[parent]]
        keep = store.has_legacy[self.pairs[parent]["pos_ids"]]
        self.pairs[compat_task] = {k: v[keep] for k, v in self.pairs[parent].items()}
        pool = np.flatnonzero(store.has_legacy)
        self.index_ids[compat_task] = np.sort(
            rng.choice(pool, min(config.eval.index_size, len(pool)), replace=False))

  def run(self, statics, params) -> dict[str, float]:
    return {f"recall@{K}/{task}": value for task, value in self.evaluate(statics, params).items()}

  def evaluate(self, statics, params) -> dict[str, float]:
    """Recall@10 per task for `params`: {task: recall}."""
    query_fn = functools.partial(query_tower_fn, statics, params)
    entity_fn = functools.partial(entity_tower_fn, statics, params)
    results = {}
    for task, pairs in self.pairs.items():
      if len(pairs["pos_ids"]) == 0:
        continue
      q = require_finite(f"{task} query", self.towers.run(query_fn,
                                                          {"tokens": pairs["query_tokens"]}))
      if task in schema.COMPAT_TASKS:
        store = self.stores[schema.TASK_ENTITY[schema.COMPAT_TASKS[task]]]
        q = np.asarray(compat.compat_query(q, self.config.model.compat_dim))
        pos = np.asarray(compat.legacy_embedding(store.legacy[pairs["pos_ids"]]))
        index = np.asarray(compat.legacy_embedding(store.legacy[self.index_ids[task]]))
      else:
        kind = schema.TASK_ENTITY[task]
        fn = query_fn if kind == "queries" else entity_fn
        pos = require_finite(f"{task} positive", self.towers.run(
            fn, self.towers.entity_inputs(kind, pairs["pos_ids"])))
        index = require_finite(f"{task} index", self.towers.run(
            fn, self.towers.entity_inputs(kind, self.index_ids[task])))
      ranks = np.concatenate([
          np.asarray(ranks_against_index(q[s:e], pos[s:e], index, pairs["pos_ids"][s:e],
                                         self.index_ids[task]))
          for s, e in _chunks(len(q), self.batch)])
      results[task] = float(np.mean(ranks <= K))
    return results


@jax.jit
def query_tower_fn(statics, params, tokens):
  return statics.model(params).query_tower(tokens)


@jax.jit
def entity_tower_fn(statics, params, tokens, fields, continuous):
  return statics.model(params).entity_tower(tokens, fields, continuous)
