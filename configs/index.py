"""Options of `launch.py embed`, `index` and `bench retrieval` (the offline half of serving).

  python launch.py embed --config.bundle=runs/demo/bundle \
      --config.entities=runs/demo/prepared/entities/pins.parquet --out=runs/demo/embeddings
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
  c.embeddings = config_dict.placeholder(str)  # index, bench: <kind>/shard-*.parquet directory
  c.target_recall = 0.95                       # index: Recall@10 against exact search to tune for
  c.bench_size = 1_000_000                     # bench: rows of the clustered synthetic database
  return c
