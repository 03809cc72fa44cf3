"""OmniSearchSage at production size (SPEC §1), for `launch.py compile` memory checks.

Derives from configs/omnisage_synthetic.py (every field is documented there) and changes only the
sizes:
  query tower   DistilBERT size: 6 layers, hidden 768, 12 heads, intermediate 3072, WordPiece
                vocab 30,522 (the English DistilBERT's; SPEC's multilingual one has 119,547),
                queries padded to the full 64 tokens (the worst case for memory)
  entity tower  100,000 x 256 hash table, V = 1 + 64,000 trigrams + 200,000 unigrams + 1,000,000
                bigrams = 1,264,001 n-gram ids, MLP 1024 -> 1024 -> 256, 384 tokens per entity
  batch         65,536 pairs per global batch in the official 8:4:2:2 mix (pin, product, query,
                offsite product). We have no offsite-product task, and offsite products are
                products, so their share joins q2product: q2pin 8/16 = 32,768, q2product
                (4+2)/16 = 24,576, q2query 2/16 = 8,192. The compatibility tasks (q2pinsage,
                q2itemsage) reuse the q2pin / q2product pairs as in the official code.
  negatives     "4 random negatives per pair" (SPEC): our random negatives are shared by all rows
                of a task, one count for every task, so 4 x 65,536 pairs / 3 tasks = 87,384 per
                task (rounded to a multiple of 8 devices): 262,152 random negatives per step.
  loss          the blockwise logsumexp when the loss has one (`loss.impl`), else dense.
  towers        embedded 512 rows per device at a time, recomputed in backward
                (train.tower_chunk_rows, omnisage/train/microbatch.py). Without it the towers' saved
                activations alone do not fit a device (mostly the query tower's 20k queries x
                64 tokens x 6 layers); with it the step fits (docs/performance.md). 512 rows x
                64 tokens keeps every query-tower matmul 32k rows tall, still large for a GPU.

Usage:
  python launch.py compile --config=configs/omnisage_production.py --mesh=8x1
  python launch.py compile --config=configs/omnisage_production.py --mesh=8x1 \
      --config.loss.random_negatives=8192     # what-if variants
  python launch.py compile --config=configs/omnisage_production.py --mesh=8x1 \
      --config.train.tower_chunk_rows=0       # no tower chunks: does not fit
"""

from configs import omnisage_synthetic

GLOBAL_BATCH = 65_536
TASK_MIX = {"q2pin": 8, "q2product": 4 + 2, "q2query": 2}   # offsite products are products
NEGATIVES_PER_PAIR = 4
DEVICES = 8


def get_config(arg: str | None = None):
  c = omnisage_synthetic.get_config()
  d, m, q = c.data, c.model, c.model.query
  d.query_vocab_size = 30_522
  d.query_max_len = 64
  d.batch_query_len = 64
  d.trigram_vocab = 64_000
  d.unigram_vocab = 200_000
  d.bigram_vocab = 1_000_000
  d.max_entity_tokens = 384
  d.field_max_tokens = 160

  m.embed_dim = 256
  m.compat_dim = 256
  m.hash_rows = 100_000
  m.text_dim = 256
  m.mlp_hidden = 1024
  q.vocab_size = 30_522
  q.hidden = 768
  q.layers = 6
  q.heads = 12
  q.intermediate = 3072

  units = sum(TASK_MIX.values())
  for task, share in TASK_MIX.items():
    c.tasks[task] = GLOBAL_BATCH * share // units
  c.tasks.compat = True
  per_task = NEGATIVES_PER_PAIR * GLOBAL_BATCH / len(TASK_MIX)
  c.loss.random_negatives = int(round(per_task / DEVICES)) * DEVICES
  if "impl" in c.loss:   # the blockwise loss keeps B x N logits out of memory
    c.loss.impl = "blockwise"
  c.train.tower_chunk_rows = 512
  c.train.steps = 150_000
  c.train.warmup_steps = 750
  c.mesh.data = DEVICES
  c.mesh.model = 1
  return c
