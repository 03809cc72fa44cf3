"""What both sides of benchmarks/vs_tfrs.py share: the synthetic pairs and the id hash (NumPy).

This module is imported by the JAX side (.venv) and by the TensorFlow side (.venv-peers, which has
no JAX and no omnisage), so it depends on NumPy alone.

Data: (user id, item id) pairs. User ids follow a Zipf law over `num_users` ids; each user has one
of `groups` tastes (user id mod groups) and its item is drawn from a Zipf law over the items of that
taste (item id mod groups == taste), so a two-tower model has something to learn: the in-batch
softmax loss falls from about log(batch) towards log(batch / groups). Ids are shuffled so popular
ids are not the small integers.

Hash (the same function on both sides, so both towers see the same buckets):
  bucket(id) = ((id * HASH_MULTIPLIER) mod 2^32) mod buckets      (Knuth multiplicative hash)
computed in uint32 on the JAX side (wraps mod 2^32 by itself) and in int64 on the TF side.

Usage:
  users, items = make_pairs(num_pairs=120_000, seed=0)
  save_pairs(dirname, users, items); users, items = load_pairs(dirname)
"""

import os

import numpy as np

HASH_MULTIPLIER = 2654435761  # Knuth's 2^32 / golden ratio, odd: a bijection mod 2^32
MAX_ID = 2**31 - 1            # ids fit int32 on the JAX side


def hash_buckets(ids: np.ndarray, buckets: int) -> np.ndarray:
  """The reference hash in NumPy int64 (the JAX and TF versions are tested against it)."""
  ids = np.asarray(ids, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
    raise ValueError(f"ids must lie in [0, {MAX_ID}]")
  return (ids * HASH_MULTIPLIER) % 2**32 % buckets


def zipf_ranks(rng: np.random.Generator, size: int, n: int, exponent: float) -> np.ndarray:
  """`size` draws of ranks 0..n-1 with P(rank k) proportional to (k + 1)^-exponent."""
  weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
  cdf = np.cumsum(weights)
  return np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").clip(0, n - 1)


def make_pairs(*, num_pairs: int, seed: int = 0, num_users: int = 1_000_000,
               num_items: int = 200_000, groups: int = 64,
               exponent: float = 1.1) -> tuple[np.ndarray, np.ndarray]:
  """(users, items), each [num_pairs] int32: Zipf users, Zipf items of the user's taste."""
  if num_users % groups or num_items % groups:
    raise ValueError(f"num_users ({num_users}) and num_items ({num_items}) must be multiples of "
                     f"groups ({groups})")
  rng = np.random.default_rng(seed)
  user_ids = rng.permutation(num_users)       # rank -> id, so popular ids are scattered
  users = user_ids[zipf_ranks(rng, num_pairs, num_users, exponent)]
  taste = users % groups
  per_group = num_items // groups
  item_of_rank = rng.permutation(per_group)   # same popularity order in every taste
  items = taste + groups * item_of_rank[zipf_ranks(rng, num_pairs, per_group, exponent)]
  return users.astype(np.int32), items.astype(np.int32)


def save_pairs(dirname: str, users: np.ndarray, items: np.ndarray) -> None:
  os.makedirs(dirname, exist_ok=True)
  np.save(os.path.join(dirname, "users.npy"), users)
  np.save(os.path.join(dirname, "items.npy"), items)


def load_pairs(dirname: str) -> tuple[np.ndarray, np.ndarray]:
  paths = [os.path.join(dirname, name) for name in ("users.npy", "items.npy")]
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found (written by benchmarks/vs_tfrs.py)")
  users, items = (np.load(path) for path in paths)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError(f"{paths[0]} and {paths[1]} must be 1-d arrays of the same length, got "
                     f"{users.shape} and {items.shape}")
  return users, items
