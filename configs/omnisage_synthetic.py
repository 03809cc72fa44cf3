"""OmniSearchSage on the built-in synthetic world (the `make demo` job).

Usage:
  python launch.py train --config=configs/omnisage_synthetic.py --workdir=runs/demo
  python launch.py train --config=configs/omnisage_synthetic.py:tiny --workdir=/tmp/t   # tests

`get_config("tiny")` shrinks every size so the whole pipeline runs in seconds on one CPU core.
"""

import math

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for data generation, init, sampling and shuffling

  # --- the synthetic world (omnisage/data/omnisearchsage/synthetic.py) ----------------------------
  s = c.synthetic = ml_collections.ConfigDict()
  s.num_topics = 12 if tiny else 48           # latent topics shared by queries, pins and products
  s.words_per_topic = 20 if tiny else 40      # concepts per topic; each has a form per language
  s.languages = ("en", "fr", "de", "es")     # word forms differ per language (accents, suffixes)
  s.num_queries = 600 if tiny else 12_000    # distinct query strings
  s.num_pins = 800 if tiny else 20_000
  s.num_products = 400 if tiny else 8_000
  s.num_boards = 200 if tiny else 4_000       # boards that pins get saved to (board titles feature)
  s.num_board_saves = 3_000 if tiny else 80_000
  s.num_query_pin = 6_000 if tiny else 250_000       # query->pin engagement rows (save/long_click)
  s.num_query_product = 3_000 if tiny else 120_000   # query->product rows (4 engagement types)
  s.num_query_query = 1_500 if tiny else 60_000      # query->query click rows
  s.num_days = 60                              # log span; the last days become the eval window
  s.zipf_exponent = 1.1                        # popularity of queries and entities within a topic
  s.missing_text_rate = 0.05                   # entities without title/description
  s.missing_feature_rate = 0.1                 # entities without PinSage/ItemSage/visual
  s.bad_row_rate = 0.002                       # injected bad rows (NaN vectors, bad bytes, ...)
  s.absurd_text_chars = 6_000                  # injected over-long texts (> data.max_text_chars)

  # --- prepare (omnisage/data/omnisearchsage/prepare.py) ------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.raw_dir = ""             # Parquet input tables; empty: generate the synthetic world here
  d.prepared_dir = ""        # output of prepare; empty: <workdir>/prepared
  # prepare runs on Ray Data: "" starts a private Ray inside the job; "HOST:6379", "auto" or
  # "ray://HOST:10001" runs it on that cluster (`ray start --head`; docs/scale_out.md)
  d.ray_address = ""
  # The object store of that private Ray, in GB: blocks beyond it spill to disk (Ray's spilling),
  # so prepare's memory stays flat as the data grows. 0: Ray's default (30% of RAM).
  d.ray_object_store_gb = 1.0
  d.eval_days = 7            # the last eval_days of logs are held out for evaluation
  d.gap_days = 1             # and the day before them is dropped (time gap, SPEC §1 eval)
  d.pin_pair_cap = 50        # pairs kept per pin (SPEC: against popularity bias)
  d.product_pair_cap = 200   # pairs kept per product
  d.board_titles_top = 10
  d.engaged_queries_top = 20
  # Engaged queries are refreshed by merging n-day windows into the stored top lists (SPEC:
  # "every n days merge the new window's list with the current top-20"); 0: one full recompute.
  d.engaged_refresh_days = 7
  d.query_vocab_file = ""    # a WordPiece vocab.txt; empty: learn one with tensorflow-text
  d.query_vocab_size = 2_000 if tiny else 8_000
  d.query_lower_case = True
  d.query_max_len = 64       # WordPiece tokens including [CLS] and [SEP]
  # Training/eval batches pad (or crop) queries to this many tokens. Synthetic queries have at
  # most ~13 tokens, so padding to 64 would spend 4x the query-tower compute on padding; queries
  # longer than this are truncated and counted in the train log.
  d.batch_query_len = 16
  d.query_lexical_len = 48   # a query's n-gram ids with model.query.lexical (cropped beyond)
  d.trigram_vocab = 4_000 if tiny else 30_000
  d.unigram_vocab = 2_000 if tiny else 30_000
  d.bigram_vocab = 4_000 if tiny else 60_000
  d.max_entity_tokens = 192 if tiny else 384   # all fields together, after per-field caps
  d.field_max_tokens = 96 if tiny else 160     # cap per text field
  d.max_text_chars = 5_000   # longer text is an "absurd length" bad row
  d.num_shards = 2 if tiny else 4
  d.worker_count = 0         # Grain worker processes (0: in the training process)
  d.hard_negatives_dir = ""   # hard-negative tables ("": <prepared>/hard_negatives)

  # --- models (omnisage/models) --------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.embed_dim = 256          # dense output dim of both towers (paper 256, official code 512)
  m.compat_dim = 256         # prefix of the query vector used by compatibility tasks (SPEC)
  m.hash_rows = 100_000      # rows of the shared double-hashed table E
  m.text_dim = 64 if tiny else 128   # width of E and of a field embedding
  m.mlp_hidden = 128 if tiny else 1024
  m.hash_seed = 1234         # fixes the two universal hash functions
  m.legacy_skip = False      # identity path legacy vector -> output (entity_tower.py; small data)
  q = m.query = ml_collections.ConfigDict()
  q.hf_checkpoint = ""       # directory with config.json + model.safetensors; empty: random init
  q.hidden = 64 if tiny else 128   # DistilBERT: 768; small here so the demo trains on 2 cores
  q.layers = 1 if tiny else 2
  q.heads = 2 if tiny else 4
  q.intermediate = 128 if tiny else 512
  q.max_len = d.get_ref("query_max_len")   # position embeddings
  q.vocab_size = 0           # 0: read from the prepared vocabulary
  q.pooling = "cls"          # "cls" (the paper) or "mean" (sentence-transformers checkpoints)
  q.frozen_layers = 0        # pretrained start: freeze embeddings + this many bottom layers
  q.projection_init = ""     # .npy [hidden, embed_dim] start for the projection head; "": random
  # Lexical path (models/lexical_path.py): the query's n-grams through the entity tower's hash
  # table, added to the projection; exact words, sizes and part numbers reach the query vector.
  q.lexical = False
  # Lexical channel (models/lexical_path.py, needs q.lexical): both towers' title n-grams through
  # one shared map, concatenated to the dense output (width embed_dim + lexical_dim), its share of
  # the score learned from lexical_weight. 0: off.
  m.lexical_dim = 0
  m.lexical_weight = 0.3

  # --- tasks and loss (omnisage/train/losses.py) -------------------------------------------
  t = c.tasks = ml_collections.ConfigDict()
  # pairs per task in each global batch: the task mix sets task influence (official code 8:4:2:2)
  t.q2pin = 64 if tiny else 256
  t.q2product = 32 if tiny else 128
  t.q2query = 16 if tiny else 64
  t.compat = True            # add q2pinsage / q2itemsage on the q2pin / q2product pairs
  l = c.loss = ml_collections.ConfigDict()
  l.random_negatives = 32 if tiny else 128   # shared random negatives per task per step
  # Per-row hard negatives from <prepared>/hard_negatives/<task>.parquet (judged or mined; no
  # logQ), added to the row's in-batch softmax; 0 = none (data/omnisearchsage/hard_negatives.py).
  l.hard_negatives = 0
  l.temperature_init = math.log(1 / 0.07)
  l.temperature_max = math.log(100.0)
  l.logq = True              # subtract log Q after temperature scaling (SPEC sign convention)
  l.nested_dims = ()         # e.g. (16, 32, 64, 128): Matryoshka prefixes, weight below
  l.nested_weight = 0.05
  # Logsumexp over the B x (B + N) logits (losses.LSE_IMPLS): "dense" materialises them;
  # "blockwise" streams column blocks of block_size (custom VJP, recomputed in backward): same loss
  # and gradients, O(B x block_size) memory, for global batches of 10k+ pairs
  # (benchmarks/large_batch.py).
  l.impl = "dense"
  l.block_size = 4096
  f = l.freq = ml_collections.ConfigDict()   # streaming frequency estimate (Yi et al. 2019)
  f.size = 1 << 14 if tiny else 1 << 20
  f.num_hashes = 2
  f.alpha = 0.01

  # --- optimisation and loop (omnisage/train) ----------------------------------------------
  o = c.train = ml_collections.ConfigDict()
  o.steps = 30 if tiny else 300
  o.learning_rate = 2e-3
  o.pretrained_lr_scale = 1.0   # learning-rate factor of a pretrained query encoder's layers
  o.warmup_steps = 5 if tiny else 30
  o.weight_decay = 1e-4
  o.grad_clip = 1.0
  # Rows per device each tower embeds at once, recomputed in backward (GradCache,
  # omnisage/train/microbatch.py): peak activation memory of one chunk instead of the whole batch,
  # for ~1/3 more tower FLOPs. 0: the whole batch at once (what fits on a laptop-size batch).
  o.tower_chunk_rows = 0
  o.log_every = 5 if tiny else 25
  o.eval_every = 0           # 0: evaluate only at the start and the end
  o.checkpoint_every = 10 if tiny else 100
  o.keep_checkpoints = 3
  o.async_checkpoint = True
  o.restart_if_corrupt = False   # True: when no checkpoint is intact, move them aside, start at 0
  o.nonfinite = "stop"           # a NaN/inf loss or gradient norm: "stop" the run, or "skip" it

  # --- device mesh (omnisage/train/sharding.py) ---------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  # -1: all devices not used by `model`
  c.mesh.data = -1
  c.mesh.model = 1           # shards of the hash table / per-token weights

  # --- evaluation (omnisage/train/evaluators/recall.py) -------------------------------------------
  e = c.eval = ml_collections.ConfigDict()
  # The paper ranks against 1.5M random entities; the synthetic catalogue has 8k-20k per kind.
  e.index_size = 500 if tiny else 5_000     # random corpus entities the positive is ranked against
  e.max_pairs = 300 if tiny else 2_000      # eval pairs per task
  e.batch_size = 256 if tiny else 1_024
  # The evaluators run at the start, every train.eval_every steps and at the end of training, and
  # by `launch.py eval` (omnisage/train/evaluators/): name -> {"type": module, **its kwargs}.
  c.evals = ml_collections.ConfigDict({"recall": {"type": "recall"}})

  # --- hard-negative mining, `launch.py mine` (omnisage/train/omnisearchsage/mine.py) ----------
  mn = c.mine = ml_collections.ConfigDict()
  mn.tasks = ("q2pin", "q2product")   # tasks whose training queries get mined negatives
  mn.sources = ("model",)             # "model" (the checkpoint's towers) and/or "bm25" (titles)
  mn.rank_lo = 10                     # the window of ranks negatives come from: [lo, hi), 0-based
  mn.rank_hi = 100
  mn.per_query = 5                    # negatives kept per query and source (closest to rank_lo)
  mn.chunk_queries = 1_024            # queries per resumable chunk
  mn.step = ml_collections.config_dict.placeholder(int)   # checkpoint to mine with (newest)
  c.system = "omnisearchsage"   # omnisage/systems.py: which system's prepare/train/eval/export
  return c
