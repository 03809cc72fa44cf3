"""The per-user temporal split of user -> item retrieval (the two-tower model, PinnerSage and the
baselines are all measured on it).

Each user's engagements in time order: the last `test_fraction` (at least one) are that user's
TEST items, everything before is HISTORY. The validation split is the same cut applied again to
the history alone, so every choice (a hyper-parameter, a checkpoint) is made without the test
items. A user needs at least `min_history` history engagements to be evaluated; the others are
counted, not dropped silently. Ties in time are ordered by item id (deterministic).

A global time cut (one date for everyone) leaves few users with both a history and a future on a
small dataset like MovieLens; the per-user cut evaluates every user with enough history (the
leave-last-out family of protocols, e.g. SASRec, Kang & McAuley 2018, with a fraction instead of
one item).

Usage:
  split = per_user_split(users, items, times, test_fraction=0.2, min_history=1)
  split.history[u], split.test[u]         # item arrays in time order
  val = validation_split(split)          # the same cut inside each history
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class UserSplit:
  history: dict        # user -> item array (time order)
  history_times: dict  # user -> int64 timestamps of the history
  test: dict           # user -> item array (the held-out future)
  skipped: dict        # reason -> users left out ("too_few_engagements")

  @property
  def users(self) -> list:
    return sorted(self.test)


def per_user_split(users, items, times, test_fraction: float = 0.2,
                   min_history: int = 1) -> UserSplit:
  """The split of engagement rows (user, item, time); duplicates of (user, item) keep the first."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  users, items, times = (np.asarray(x) for x in (users, items, times))
  if not (len(users) == len(items) == len(times)):
    raise ValueError("users, items and times must have one length")
  # Integer keys for the sort (ids may be strings or objects): user, then time, then item id.
  _, user_key = np.unique(users, return_inverse=True)
  _, item_key = np.unique(items, return_inverse=True)
  order = np.lexsort((item_key, times, user_key))
  users, items, times = users[order], items[order], times[order]
  user_key, item_key = user_key[order], item_key[order]
  history, history_times, test = {}, {}, {}
  skipped = {"too_few_engagements": 0}
  bounds = np.flatnonzero(user_key[1:] != user_key[:-1]) + 1
  for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
    u_items, u_times = items[lo:hi], times[lo:hi]
    _, first = np.unique(item_key[lo:hi], return_index=True)   # engaged twice: counted once
    keep = np.sort(first)
    u_items, u_times = u_items[keep], u_times[keep]
    n_test = max(1, math.floor(len(u_items) * test_fraction))
    if len(u_items) - n_test < min_history:
      skipped["too_few_engagements"] += 1
      continue
    user = users[lo].item() if isinstance(users[lo], np.generic) else users[lo]
    history[user] = u_items[:-n_test]
    history_times[user] = u_times[:-n_test].astype(np.int64)
    test[user] = u_items[-n_test:]
  return UserSplit(history, history_times, test, skipped)


def validation_split(split: UserSplit, test_fraction: float = 0.2,
                     min_history: int = 1) -> UserSplit:
  """The same per-user cut inside each user's history: (history', validation items)."""
  users, items, times = [], [], []
  for user, h in split.history.items():
    users += [user] * len(h)
    items += h.tolist()
    times += split.history_times[user].tolist()
  return per_user_split(np.asarray(users), np.asarray(items), np.asarray(times, np.int64),
                        test_fraction, min_history)
