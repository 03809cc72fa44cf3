"""Recall@k of home-feed recommenders on the MovieLens time split (SPEC §3).

Protocol (omnisage/data/twotower/examples.py): for each evaluation user, every catalogue item is
scored from pre-cut data only; the items the user rated before the cut are excluded from the
ranking (a feed does not re-recommend what was already watched, and MovieLens has at most one
rating per (user, movie), so they can never be positives); the positives are the items rated at
or after the cut. Recall@k = |top-k ∩ positives| / min(|positives|, k), averaged over users
(omnisage.train.evaluators.corpus.corpus_metrics: the min() keeps heavy users, with hundreds of
post-cut ratings, from capping their recall far below 1).

The baselines scored the same way are in omnisage/baselines/popularity.py.

Usage:
  ev = Evaluator(config, prepared=prepared_dir)
  ev.run(statics, params)            # {"recall@50": r, "recall@100": r, "users": U}
  recall(scores, users, ks=(50, 100))   # any [U, N] scorer, e.g. a baseline
"""

import jax
import numpy as np

from omnisage.data.twotower import examples as mlx
from omnisage.models.twotower import ITEM_INPUTS, USER_INPUTS
from omnisage.train.evaluators.corpus import corpus_metrics
from omnisage.train.evaluators.recall import require_finite


def recall(scores: np.ndarray, users: dict, ks=(50, 100)) -> dict:
  """scores [U, N]: column j = catalogue index j + 1. Returns {"recall@k": float, "users": U}."""
  scores = np.array(scores, np.float64)
  if scores.shape[0] != len(users["positives"]):
    raise ValueError(f"{scores.shape[0]} score rows for {len(users['positives'])} users")
  for row, seen in enumerate(users["seen"]):
    scores[row, np.asarray(seen, np.int64) - 1] = -np.inf
  positives = [np.asarray(p, np.int64) - 1 for p in users["positives"]]
  out = {}
  for k in ks:
    out[f"recall@{k}"] = corpus_metrics(lambda rows: scores[rows], positives, k=k)[f"recall@{k}"]
  out["users"] = len(positives)
  return out


class Evaluator:
  """Recall@k (config.eval.ks) of the model on the prepared evaluation users."""

  def __init__(self, config, *, prepared: str, catalogue=None, **_):
    self.ks = tuple(config.eval.ks)
    self.batch_size = int(config.eval.batch_size)
    self.users = mlx.load_eval_users(prepared)
    self.catalogue = catalogue if catalogue is not None else mlx.Catalogue.load(prepared)

  def run(self, statics, params) -> dict:
    result = recall(self.scores(statics, params), self.users, self.ks)
    return {k: float(v) for k, v in result.items()}

  def scores(self, statics, params) -> np.ndarray:
    """[U, N] dot products of the evaluation users' vectors (features at the cut) and all
    items' vectors."""
    model = statics.model(params)

    @jax.jit
    def user_fn(x):
      return model.user_tower(*(x[k] for k in USER_INPUTS))

    @jax.jit
    def item_fn(x):
      return model.item_tower(*(x[k] for k in ITEM_INPUTS))

    cat, users = self.catalogue, self.users
    items = require_finite("item", embed_all(item_fn, cat.item_inputs(np.arange(1, cat.size + 1)),
                                             self.batch_size))
    user_inputs = cat.user_inputs(users["hist_items"], users["hist_age"], users["user_dense"])
    return require_finite("user", embed_all(user_fn, user_inputs, self.batch_size)) @ items.T


def embed_all(fn, inputs: dict, batch_size: int) -> np.ndarray:
  """Runs a jitted tower over dict-of-array inputs in fixed-size (padded) blocks."""
  n = len(next(iter(inputs.values())))
  out = []
  for start in range(0, n, batch_size):
    block = {k: v[start:start + batch_size] for k, v in inputs.items()}
    m = len(next(iter(block.values())))
    padded = {k: np.pad(v, ((0, batch_size - m),) + ((0, 0),) * (v.ndim - 1))
              for k, v in block.items()}
    out.append(np.asarray(fn(padded))[:m])
  return np.concatenate(out)
