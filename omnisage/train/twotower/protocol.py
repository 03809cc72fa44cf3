"""The two-tower model scored by the per-user protocol's metrics (user_retrieval.user_metrics).

The prepared evaluation users of a per-user stage (omnisage/data/twotower/user_protocol.py) are
embedded by the user tower, every candidate item by the item tower, and the [U, C] dot products go
to `user_metrics`, the same function that scores the baselines: one ranking rule (history
excluded, full ranking over the candidates) for every method. `candidates` are the catalogue
indices ranked, so the model ranks exactly the items the baselines rank.

The towers are jitted once with the parameters as an argument (not closed over), so evaluating
every few hundred steps inside training compiles nothing new.

Usage:
  ev = ProtocolEvaluator(prepared_dir, catalogue, candidates=np.arange(1, catalogue.size + 1))
  ev.run(statics, params)     # {"recall@50": .., "recall@50_se": .., "ndcg@10": .., "users": U}
"""

import jax
import numpy as np

from omnisage.data.twotower import examples as mlx
from omnisage.models.twotower import ITEM_INPUTS, USER_INPUTS
from omnisage.train.evaluators.user_retrieval import KS, user_metrics


@jax.jit
def _users(statics, params, inputs):
  return statics.model(params).user_tower(*(inputs[k] for k in USER_INPUTS))


@jax.jit
def _items(statics, params, inputs):
  return statics.model(params).item_tower(*(inputs[k] for k in ITEM_INPUTS))


def _blocks(fn, statics, params, inputs: dict, batch_size: int) -> np.ndarray:
  """fn over dict-of-array inputs in fixed-size (padded) blocks: one compiled shape."""
  n = len(next(iter(inputs.values())))
  out = []
  for start in range(0, n, batch_size):
    block = {k: v[start:start + batch_size] for k, v in inputs.items()}
    m = len(next(iter(block.values())))
    padded = {k: np.pad(v, ((0, batch_size - m),) + ((0, 0),) * (v.ndim - 1))
              for k, v in block.items()}
    out.append(np.asarray(fn(statics, params, padded))[:m])
  return np.concatenate(out)


class ProtocolEvaluator:
  """user_metrics of the model on a prepared stage's evaluation users."""

  def __init__(self, prepared: str, catalogue: mlx.Catalogue, candidates=None, ks=KS,
               batch_size: int = 1024):
    self.users = mlx.load_eval_users(prepared)
    self.catalogue, self.ks, self.batch_size = catalogue, tuple(ks), batch_size
    self.candidates = np.arange(1, catalogue.size + 1) if candidates is None \
        else np.asarray(candidates, np.int64)
    column = {int(c): j for j, c in enumerate(self.candidates)}
    self.seen = [[column[i] for i in s if i in column] for s in self.users["seen"]]
    self.positives = [[column[i] for i in p if i in column] for p in self.users["positives"]]
    self.keep = [u for u, p in enumerate(self.positives) if p]   # a positive among candidates

  def scores(self, statics, params) -> np.ndarray:
    """[U, C] dot products of the evaluated users and the candidates."""
    cat, users = self.catalogue, self.users
    items = _blocks(_items, statics, params, cat.item_inputs(self.candidates), self.batch_size)
    inputs = cat.user_inputs(users["hist_items"][self.keep], users["hist_age"][self.keep],
                             users["user_dense"][self.keep])
    users = _blocks(_users, statics, params, inputs, self.batch_size)
    if not (np.isfinite(items).all() and np.isfinite(users).all()):
      raise FloatingPointError("non-finite two-tower embeddings: no metrics from them")
    return users @ items.T

  def run(self, statics, params) -> dict:
    return user_metrics(self.scores(statics, params), [self.seen[u] for u in self.keep],
                        [self.positives[u] for u in self.keep], ks=self.ks)


__all__ = ["ProtocolEvaluator"]
