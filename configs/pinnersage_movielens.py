"""PinnerSage's daily batch job (SPEC §4) over MovieLens-style item embeddings and user actions.

  python launch.py train --config=configs/pinnersage_movielens.py --workdir=runs/pinnersage \
      --config.actions=ACTIONS.parquet    # user_id, item_id, timestamp (unix seconds)

writes <workdir>/{medoids,members}.parquet and summary.json (omnisage/serving/pinnersage/batch.py);
`launch.py serve --config.bundle=runs/twotower/bundle --config.index=runs/twotower/index
--config.pinnersage=runs/pinnersage --config.item_embeddings=runs/twotower/embeddings` serves it.
The older `launch.py pinnersage --item-embeddings=... --actions=... --out=...` still works.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.system = "pinnersage"   # omnisage/systems.py
  # Item embeddings: a directory of <kind>/shard-*.parquet from `launch.py embed` (the two-tower
  # item tower's by default), or one Parquet file with columns id, embedding.
  c.item_embeddings = "runs/twotower/embeddings"
  c.item_kind = config_dict.placeholder(str)   # kind directory to read (default: the only one)
  c.actions = config_dict.placeholder(str)     # Parquet: user_id, item_id, timestamp (required)
  # Ward cut height in embedding units: keeps a few clusters per user on unit-norm embeddings.
  # MovieLens validation with PMI-SVD embeddings prefers ~4.3, i.e. about one cluster per user
  # (docs/pinnersage.md): choose it per embedding with benchmarks/pinnersage.py.
  c.alpha = 1.4
  c.lam = 0.01             # importance decay per day, exp(-lambda * age_days) (SPEC §4)
  c.window_days = 90.0     # days of history clustered (SPEC §4)
  c.now = config_dict.placeholder(int)   # unix seconds the window ends at (default: last action)
  c.max_history = 4096     # most recent actions kept per user (bounds O(n^2) time and memory)
  # "local": this process (serving/pinnersage/batch.py); "ray": Ray Data, one group per user
  # (serving/pinnersage/ray_job.py, docs/scale_out.md). Both write the same files.
  c.engine = "local"
  c.ray_address = config_dict.placeholder(str)   # engine=ray: host:port or "auto"; unset: local
  c.ray_workers = 0        # engine=ray: concurrent tasks; 0: one per CPU of the cluster
  return c
