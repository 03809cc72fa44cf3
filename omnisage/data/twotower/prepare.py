"""`launch.py prepare` for the home-feed two-tower system (SPEC §3): MovieLens -> examples.

Usage: `summary = prepare(config, workdir)`   # writes prepared_dir_of(config, workdir)
"""

import os
import time

from omnisage.data.sources import movielens
from omnisage.data.twotower import examples as mlx
from omnisage.data.workdir import datasets_root, prepared_dir_of

DATASET = "movielens-latest-small"


def movielens_dir_of(config) -> str:
  if config.data.movielens_dir:
    return config.data.movielens_dir
  return os.path.join(datasets_root(), DATASET)


def prepare(config, workdir: str) -> dict:
  """`launch.py prepare` of the two-tower system: MovieLens -> <prepared>/ (examples.py)."""
  t0 = time.time()
  ml = movielens.load(movielens_dir_of(config))
  out = prepared_dir_of(config, workdir)
  meta = mlx.prepare_movielens(ml, config.data, out)
  bad = meta["bad_rows"]
  return {"prepared_dir": out, "cut": meta["cut"], "train_examples": meta["train_examples"],
          "eval_users": meta["eval_users"], "eval_positives": meta["eval_positives"],
          "cold_start_eval_users_skipped": meta["cold_start_eval_users_skipped"],
          "items": meta["num_items"], "bad_rows": {"total": bad["total"],
                                                   "by_reason": bad["by_reason"]},
          "seconds": round(time.time() - t0, 2)}
