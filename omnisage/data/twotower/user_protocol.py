"""Two-tower examples on the per-user temporal protocol (omnisage/data/user_split.py).

The protocol that every user -> item method is measured on: each user's last 20% of engagements
are TEST items, the rest HISTORY; the VALIDATION split is the same cut inside each history. A
stage ("validation" or "test") names which pair is used:

  stage        training interactions            evaluated users' positives
  validation   validation.history (every user)  validation.test
  test         split.history (every user)       split.test

Nothing after a user's history reaches training: the examples, the item catalogue's popularity
features and the evaluation users' features are all computed from the stage's histories.

Training example = (user features at a request time, one LATER item of the same user's history).
With `future_window` W = 0 it is next-item prediction (the request is made just before the target,
features from every engagement strictly earlier in time, as examples.py does on the global split).
With W > 0 the request time is moved back by a uniform 0..W engagements before the target, so the
tower also learns to predict items a few engagements ahead: the evaluation asks for the next 20%
of a user's engagements, not the next one. PinnerFormer (Pancha et al., KDD 2022) trains its user
embedding the same way ("dense all-action" loss: predict any engagement in a future window) for
the same reason.

Evaluation user = a user of the stage's test side: features at request time = one second after
the last history engagement (every history item is strictly earlier, as in training), `seen` =
the history (excluded from the ranking), `positives` = the held-out items. The tables have the
layout of examples.py, so the Grain pipeline, the trainer, the evaluator and the bundle read them
unchanged.

Usage:
  train, evals = build_user_examples(split_for_stage, index_of, history_len=50, future_window=8)
"""

import numpy as np
import pyarrow as pa

from omnisage.data.twotower.examples import EXAMPLE_COLUMNS, user_features
from omnisage.data.user_split import UserSplit, per_user_split, validation_split

STAGES = ("validation", "test")


def stage_split(users, items, times, stage: str, test_fraction: float = 0.2) -> UserSplit:
  """The UserSplit a stage trains on (its histories) and scores (its test items)."""
  if stage not in STAGES:
    raise ValueError(f"data.stage={stage!r}: one of {', '.join(STAGES)}")
  split = per_user_split(users, items, times, test_fraction)
  return split if stage == "test" else validation_split(split, test_fraction)


def history_ratings(split: UserSplit) -> pa.Table:
  """The stage's training interactions as a ratings-like table (user, movie, timestamp)."""
  users, movies, times = [], [], []
  for user in split.users:
    h = split.history[user]
    users += [user] * len(h)
    movies += h.tolist()
    times += split.history_times[user].tolist()
  return pa.table({"user": pa.array(np.asarray(users, np.int64)),
                   "movie": pa.array(np.asarray(movies, np.int64)),
                   "timestamp": pa.array(np.asarray(times, np.int64))})


def build_user_examples(split: UserSplit, index_of: dict, history_len: int,
                        future_window: int = 0, seed: int = 0, item_dense=None
                        ) -> tuple[dict, dict]:
  """(train example columns, eval user columns) of a stage's split (module docstring).

  index_of: movie id -> catalogue index; item_dense: [N + 1, 2] popularity features of the
  catalogue (row = index), used for every example (the same at training and evaluation time).
  """
  rng = np.random.default_rng(seed)
  train = {k: [] for k in EXAMPLE_COLUMNS}
  evals = {k: [] for k in ("user", "hist_items", "hist_age", "user_dense", "seen", "positives")}
  dense_of = (lambda i: np.zeros(2, np.float32)) if item_dense is None else \
      (lambda i: item_dense[i])
  for user in split.users:
    items = np.array([index_of[int(m)] for m in split.history[user]], np.int32)
    ts = np.asarray(split.history_times[user], np.int64)
    n = len(items)
    # The request time of target j: engagement k = j - offset; the features use every engagement
    # strictly before t_k (same-second ratings may be one bulk session with the target).
    offsets = rng.integers(0, future_window + 1, n) if future_window else np.zeros(n, np.int64)
    request = np.maximum(np.arange(n) - offsets, 0)
    first_at = np.searchsorted(ts, ts, side="left")
    for j in range(n):
      k = request[j]
      p = first_at[k]
      h, a, d = user_features(items[:p], ts[:p], float(ts[k]), history_len)
      for key, value in zip(EXAMPLE_COLUMNS, (user, items[j], ts[j], h, a, d,
                                              dense_of(items[j]))):
        train[key].append(value)
    positives = sorted({index_of[int(m)] for m in split.test[user]})
    h, a, d = user_features(items, ts, float(ts[-1] + 1), history_len)
    for key, value in zip(("user", "hist_items", "hist_age", "user_dense", "seen", "positives"),
                          (user, h, a, d, sorted(set(items.tolist())), positives)):
      evals[key].append(value)
  return train, evals


__all__ = ["STAGES", "stage_split", "history_ratings", "build_user_examples"]
