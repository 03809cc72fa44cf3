"""Home-feed two-tower model (SPEC §3) on MovieLens Latest Small.

`get_config()`: the global time split; `get_config("per_user")`: the per-user protocol of every
user -> item method (benchmarks/twotower_movielens.py, docs/twotower.md), its stage in
`data.stage`.

Usage:
  python launch.py prepare --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py train   --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py eval    --config=configs/twotower_movielens.py --workdir=runs/twotower
  python launch.py export  --config=configs/twotower_movielens.py --workdir=runs/twotower \
      --out=runs/twotower/bundle
  python launch.py train   --config=configs/twotower_movielens.py:tiny --workdir=/tmp/t  # tests

`get_config("tiny")` (and "per_user_tiny") shrinks every size so prepare -> serve runs in seconds
on one CPU core.
"""

import math

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny", "per_user", "per_user_tiny"):
    raise ValueError(f"config arg {arg!r}: one of tiny, per_user, per_user_tiny")
  tiny = arg in ("tiny", "per_user_tiny")
  per_user = arg in ("per_user", "per_user_tiny")
  c = ml_collections.ConfigDict()
  c.system = "twotower"      # omnisage/systems.py: its prepare/train/evaluate/export
  c.seed = 0                 # init, shuffling

  # --- prepare (omnisage/data/twotower/examples.py) -------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  # The MovieLens folder; empty: $OMNISAGE_DATASETS/movielens-latest-small, else the repo's
  # ../shared/datasets/movielens-latest-small.
  d.movielens_dir = ""
  d.prepared_dir = ""        # output of prepare; empty: <workdir>/prepared
  # "per_user": the protocol of every user -> item method (omnisage/data/user_split.py,
  # omnisage/data/twotower/user_protocol.py): each user's last `test_fraction` of ratings are held
  # out. "global": one time cut for everyone at `split_quantile` (few users on both sides).
  d.split = "per_user" if per_user else "global"
  d.split_quantile = 0.8     # global time split: the first 80% of ratings (by time) train
  d.stage = "test"           # per_user: "validation" (choices) or "test" (the one final score)
  d.test_fraction = 0.2      # per_user: each user's held-out share (at least one rating)
  d.future_window = 0        # per_user: request time 0..W engagements before each target
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
  # "pool": the time-decay pools above only; "attention": plus a self-attention encoder over the
  # history (PinnerFormer's direction, Pancha et al. 2022), whose summary token joins the pools.
  m.user_encoder = "pool"
  m.max_history = 64         # attention: position-embedding rows (>= data.history_len)
  m.attention_heads = 2
  m.attention_layers = 1

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
  # Uniform random negatives shared by every row, beside the in-batch ones (mixed negatives,
  # Yang et al. 2020), log Q = log(N / catalogue size). In-batch negatives are items in
  # proportion to their popularity, so without these the rare films are almost never negatives.
  l.random_negatives = 2_048 if per_user else 0

  # --- optimisation and loop -------------------------------------------------------------------
  o = c.train = ml_collections.ConfigDict()
  # SPEC: in-batch negatives at batch size 6000. The per-user protocol trains on ~65-80k examples
  # from 610 users: 1024 gives ~65 updates per epoch and the random negatives make up the rest.
  o.batch_size = 64 if tiny else (1_024 if per_user else 6_000)
  # global: ~13 steps per epoch of ml-latest-small, ~15 epochs. per_user: ~8 epochs of the
  # validation histories; the benchmark keeps the epoch with the best validation Recall@50.
  o.steps = 8 if tiny else (500 if per_user else 200)
  o.schedule_steps = 0       # >0: the cosine schedule spans this many steps (a run stopped early)
  o.eval_every = 4 if tiny else (50 if per_user else 0)   # validation curve (benchmark hook)
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
