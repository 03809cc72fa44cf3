"""Home-feed two-tower model (SPEC §3) on MovieLens Latest Small, global time split.

Usage:
  python launch.py prepare --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py train   --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py eval    --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py export  --config=configs/twotower_movielens.py --workdir=runs/twotower \
      --out=runs/twotower/bundle
  python launch.py train   --config=configs/twotower_movielens.py:tiny --workdir=/tmp/t  # tests

`get_config("tiny")` shrinks every size so prepare -> serve runs in seconds on one CPU core.
"""

import math

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.system = "twotower"      # omnisage/systems.py: its prepare/train/evaluate/export
  c.seed = 0                 # init, shuffling

  # --- prepare (omnisage/data/twotower/examples.py) -------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  # The MovieLens folder; empty: $OMNISAGE_DATASETS/movielens-latest-small, else the repo's
  # ../shared/datasets/movielens-latest-small.
  d.movielens_dir = ""
  d.prepared_dir = ""        # output of prepare; empty: <workdir>/prepared
  d.split_quantile = 0.8     # global time split: the first 80% of ratings (by time) train
  d.history_len = 16 if tiny else 50   # H: history items per example (most recent)
  d.popularity_window_days = 90.0      # "recent popularity": ratings in this window before the cut
  d.title_vocab = 2_000 if tiny else 20_000   # title words kept (most frequent)
  d.title_tokens = 12        # title words per item (titles are short: ~3 words on average)
  d.num_shards = 2 if tiny else 4      # Parquet example shards

  # --- model (omnisage/models/twotower.py) ------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.embed_dim = 64           # SPEC: 64-d vectors, dot product
  m.id_dim = 32 if tiny else 64        # hashed item-id embedding width (both towers)
  m.hash_rows = 4_096 if tiny else 16_384   # rows of each id table (9.7k movies: few collisions)
  m.title_dim = 16 if tiny else 32
  m.title_hash_rows = 2_048 if tiny else 8_192
  m.genre_dim = 16
  m.year_dim = 8
  m.mlp_hidden = 64 if tiny else 256
  m.hash_seed = 1234         # fixes the two universal hash functions of every id table
  # Time-decay pooling of the history: one pooled vector per decay time (days), each learned.
  m.decay_days = (1.0, 30.0, 365.0)

  # --- loss (omnisage/train/losses.py, in-batch softmax only) ---------------------------------
  l = c.loss = ml_collections.ConfigDict()
  l.temperature_init = math.log(1 / 0.07)
  l.temperature_max = math.log(100.0)
  l.logq = True              # subtract log Q (streaming estimate) after temperature scaling
  f = l.freq = ml_collections.ConfigDict()   # streaming frequency estimate (Yi et al. 2019)
  f.size = 1 << 12 if tiny else 1 << 16
  f.num_hashes = 2
  # Yi et al. use 0.01 over millions of steps. Here a rare item is seen a few dozen times in the
  # whole run (batch 6000 of ~80k examples), and B ramps up from 0 as 1 - (1 - alpha)^n: with
  # 0.01 it would stay far below the true gap (too little correction). 0.1 converges in ~20.
  f.alpha = 0.1

  # --- optimisation and loop -------------------------------------------------------------------
  o = c.train = ml_collections.ConfigDict()
  o.batch_size = 64 if tiny else 6_000   # SPEC: in-batch negatives at batch size 6000
  o.steps = 8 if tiny else 200           # ~13 steps per epoch of ml-latest-small: ~15 epochs
  o.learning_rate = 3e-3
  o.warmup_steps = 2 if tiny else 20
  o.weight_decay = 1e-4
  o.grad_clip = 1.0
  o.log_every = 1 if tiny else 20
  o.checkpoint_every = 4 if tiny else 100
  o.keep_checkpoints = 3
  o.async_checkpoint = True
  o.restart_if_corrupt = False   # True: when no checkpoint is intact, move them aside, start at 0
  o.nonfinite = "stop"           # a NaN/inf loss or gradient norm: "stop" the run, or "skip" it

  # --- device mesh (omnisage/train/sharding.py) ---------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1           # -1: all devices not used by `model`
  c.mesh.model = 1           # shards of the id / title tables (rows)

  # --- evaluation ------------------------------------------------------------------------------
  e = c.eval = ml_collections.ConfigDict()
  e.ks = (50, 100)           # Recall@k over the whole catalogue, seen items excluded
  e.batch_size = 1_024       # rows per tower call when embedding the catalogue
  # `launch.py eval` runs these on the newest checkpoint (omnisage/train/evaluators/twotower.py).
  c.evals = ml_collections.ConfigDict({"twotower": {"type": "twotower"}})
  return c
