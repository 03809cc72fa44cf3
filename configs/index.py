"""Options of `launch.py embed`, `index` and `bench retrieval` (the offline half of serving).

  python launch.py embed --config.bundle=runs/demo/bundle \
      --config.entities=runs/demo/prepared/entities/pins.parquet --out=runs/demo/embeddings
  python launch.py embed ... --config.engine=ray [--config.ray_address=HEAD:6379]   # Ray Data
  python launch.py index --config.embeddings=runs/demo/embeddings --out=runs/demo/index
  python launch.py bench retrieval --config.embeddings=runs/demo/embeddings --out=runs/demo/bench

(`--config=configs/index.py` is the default of these commands; the older `--bundle`,
`--entities`, `--embeddings`, `--target-recall`, `--embed-batch-size`, `--bench-size` flags still
work.)
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.bundle = config_dict.placeholder(str)      # embed: the serving bundle (launch.py export)
  c.entities = config_dict.placeholder(str)    # embed: a prepared entity table (.parquet)
  c.batch_size = 1024                          # embed: rows per tower call
  # embed: "local" runs in this process (row group i on jax process i % process_count); "ray"
  # spreads the row groups over a Ray Data actor pool (docs/scale_out.md). Same output shards.
  c.engine = "local"
  c.ray_address = config_dict.placeholder(str)  # engine=ray: host:port or "auto"; unset: local
  c.ray_workers = 0                            # engine=ray: actors; 0: one per GPU, else per CPU
  c.max_retries = 2                            # engine=ray: re-runs of a shard whose task raised
  c.embeddings = config_dict.placeholder(str)  # index, bench: <kind>/shard-*.parquet directory
  c.target_recall = 0.95                       # index: Recall@10 against exact search to tune for
  c.bench_size = 1_000_000                     # bench: rows of the clustered synthetic database
  return c
