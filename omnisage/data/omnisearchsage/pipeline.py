"""Grain input pipeline: ArrayRecord pair shards -> multi-task batches with entity features.

One global batch holds a fixed number of pairs per task (the task mix sets task influence, SPEC §1:
the official code splits each batch 8:4:2:2). Per task:

  ArrayRecord shards -> shuffle (reseeded every epoch) -> repeat -> decode -> batch(pairs per host)
  -> this host's batches

The per-task streams are zipped, then one random map gathers entity features from the in-memory
`EntityStore` and draws the shared random negatives (SPEC "Mixed negatives", Yang et al. 2020)
and, with `loss.hard_negatives = k`, k hard negatives per row from the task's table
(hard_negatives.py).
Every random choice derives from (seed, element index), and the element index is the Grain iterator
state saved in each checkpoint, so a resumed run sees exactly the batches it would have seen.

Several hosts (processes): the shuffle is global (every host computes the same permutation of
record indices, without reading records), and global batch k is the host batches k*H .. k*H+H-1,
of which host h takes batch k*H+h. A host therefore reads (and decodes) only its own rows of each
global batch, and the hosts' rows, in host order, are exactly the batch one host would read alone;
likewise every host draws the same global random negatives and gathers only its slice. So the
global batch does not depend on the number of hosts (tests/test_multihost.py).

Usage:
  data = TrainData(config, prepared_dir)
  it = data.iterator()   # a grain DatasetIterator: next(it), it.get_state(), it.set_state()
"""

import glob
import os

import grain
import jax
import numpy as np
from grain.experimental import ZipMapDataset

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_store import EntityStore
from omnisage.data.omnisearchsage.hard_negatives import HardNegatives, table_dir
from omnisage.data.omnisearchsage.query_input import lexical_len

STEPS_LIMIT = 1 << 40  # batches per task stream; far beyond any run


def shard_paths(prepared_dir: str, split: str, task: str) -> list[str]:
  paths = sorted(glob.glob(os.path.join(prepared_dir, split, task, "*.array_record")))
  if not paths:
    raise FileNotFoundError(
        f"no {split} shards for task {task} under {prepared_dir}/{split}/{task}")
  return paths


class DecodePair(grain.transforms.Map):
  """Record bytes -> fixed-shape arrays (query tokens padded with 0 to max_len).

  queries: the query store's rows ([num_queries, W], EntityStore.tokens) when they differ from
  the record's WordPiece ids (the lexical query tower's packed rows): a pair's query tokens are
  then its query's row.
  """

  def __init__(self, max_len: int, queries: np.ndarray | None = None):
    self.max_len = max_len
    self.queries = queries

  def map(self, record: bytes) -> dict:
    pair = schema.decode_pair(record)
    if self.queries is not None:
      tokens = self.queries[pair["query_index"]]
    else:
      tokens = np.zeros(self.max_len, np.int32)
      n = min(len(pair["query_tokens"]), self.max_len)
      tokens[:n] = pair["query_tokens"][:n]
    return {"query_tokens": tokens,
            "query_ids": np.int32(pair["query_index"]),
            "pos_ids": np.int32(pair["entity_index"])}


def load_stores(prepared_dir: str, data_config, lexical_len: int = 0) -> dict[str, EntityStore]:
  """Entity stores keyed by entity kind (pins, products, queries); lexical_len: the query rows'
  n-gram width (query_input.lexical_len of the config; 0 without the lexical path)."""
  return {
      "pins": EntityStore.load(prepared_dir, "pins", data_config.max_entity_tokens),
      "products": EntityStore.load(prepared_dir, "products", data_config.max_entity_tokens),
      "queries": EntityStore.load(prepared_dir, "queries", data_config.batch_query_len,
                                  lexical_len),
  }


def packed_queries(stores: dict, data_config) -> np.ndarray | None:
  """The query store's rows when they are packed with n-gram ids (DecodePair's `queries`)."""
  rows = stores["queries"].tokens
  return rows if rows.shape[1] != data_config.batch_query_len else None


def task_batch_sizes(config) -> dict[str, int]:
  return {task: int(config.tasks[task]) for task in schema.TASK_ENTITY if config.tasks[task] > 0}


class AddFeaturesAndNegatives(grain.transforms.RandomMap):
  """Gathers positive/negative entity features and samples shared random negatives.

  Random negatives are drawn uniformly from the task's catalogue; `neg_log_q` is the log of the
  expected number of draws of an item, log(n * 1/N), the same quantity the in-batch correction
  uses for batch items (SPEC: log Q = log count - log total + log B). Compatibility negatives are
  drawn from the entities that HAVE a legacy vector, i.e. from the old index.
  """

  def __init__(self, stores, tasks: list[str], negatives: int, compat: bool,
               rows: slice = slice(None), hard: dict | None = None, hard_k: int = 0):
    self.hard, self.hard_k = hard or {}, hard_k   # task -> HardNegatives; per-row count
    self.stores = stores
    self.tasks = tasks
    self.n = negatives   # global count: every host draws all of them and keeps `rows`
    self.rows = rows
    self.compat = compat
    self.with_legacy = {kind: np.flatnonzero(s.has_legacy) for kind, s in stores.items()
                        if s.has_legacy is not None}

  def random_map(self, per_task: tuple, rng: np.random.Generator) -> dict:
    out = {}
    for task, pairs in zip(self.tasks, per_task):
      store = self.stores[schema.TASK_ENTITY[task]]
      batch = dict(pairs)
      batch.update(store.gather(pairs["pos_ids"], "pos"))
      if self.hard_k:   # hard negatives of each row's query ([B, k]; padding slots invalid)
        table = self.hard.get(task)
        if table is None:
          ids = np.zeros((len(pairs["pos_ids"]), self.hard_k), np.int32)
          valid = np.zeros(ids.shape, bool)
        else:
          ids, valid = table.sample(pairs["query_ids"], pairs["pos_ids"], self.hard_k, rng)
        batch["hard_ids"], batch["hard_valid"] = ids, valid
        for key, value in store.gather(ids.ravel(), "hard").items():
          if not key.endswith("legacy"):
            batch[key] = value.reshape(ids.shape + value.shape[1:])
      neg_ids = rng.integers(0, store.size, self.n).astype(np.int32)[self.rows]
      batch["neg_ids"] = neg_ids
      batch["neg_log_q"] = np.full(len(neg_ids), np.log(self.n / store.size), np.float32)
      neg = store.gather(neg_ids, "neg")
      # The legacy vectors of random negatives are not used: compat tasks have their own.
      neg.pop("neg_legacy", None)
      neg.pop("neg_has_legacy", None)
      batch.update(neg)
      if self.compat and store.has_legacy is not None:
        pool = self.with_legacy[store.kind]
        compat_ids = pool[rng.integers(0, len(pool), self.n)[self.rows]].astype(np.int32)
        batch["compat_neg_ids"] = compat_ids
        batch["compat_neg_legacy"] = store.legacy[compat_ids]
        batch["compat_neg_log_q"] = np.full(len(compat_ids), np.log(self.n / len(pool)),
                                            np.float32)
      out[task] = batch
    return out


class TrainData:
  """The training input pipeline of one host (process)."""

  def __init__(self, config, prepared_dir: str, stores=None, process_index: int | None = None,
               process_count: int | None = None):
    self.config = config
    self.prepared_dir = prepared_dir
    self.stores = stores if stores is not None else load_stores(prepared_dir, config.data,
                                                                lexical_len(config))
    self.tasks = list(task_batch_sizes(config))
    # Default: this JAX process; explicit values let a test build every host's pipeline in one.
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count

  def _per_host(self, global_count: int, what: str) -> int:
    if global_count % self.process_count:
      raise ValueError(f"{what}={global_count} is not divisible by {self.process_count} hosts")
    return global_count // self.process_count

  def dataset(self) -> grain.MapDataset:
    cfg = self.config
    per_task = []
    for i, task in enumerate(self.tasks):
      source = grain.sources.ArrayRecordDataSource(shard_paths(self.prepared_dir, "train", task))
      ds = grain.MapDataset.source(source)
      ds = (ds.seed(cfg.seed + 1000 * i).shuffle().repeat()
            .map(DecodePair(cfg.data.batch_query_len, packed_queries(self.stores, cfg.data)))
            .batch(self._per_host(cfg.tasks[task], f"tasks.{task}"), drop_remainder=True))
      # This host's rows of every global batch (MapDatasets are lazy: other rows are never read).
      ds = ds[self.process_index::self.process_count]
      # Repeated streams are "infinite" with a length that depends on the batch size; the zip
      # needs equal lengths, so all are cut to the same (practically endless) number of steps.
      per_task.append(ds[:STEPS_LIMIT])
    negatives = self._per_host(cfg.loss.random_negatives, "loss.random_negatives")
    rows = slice(self.process_index * negatives, (self.process_index + 1) * negatives)
    features = AddFeaturesAndNegatives(self.stores, self.tasks, cfg.loss.random_negatives,
                                       cfg.tasks.compat, rows, *self._hard_negatives())
    # One seed for all hosts: they draw the same global negatives and each keeps its rows.
    return ZipMapDataset(parents=per_task).random_map(features, seed=cfg.seed + 7919)

  def _hard_negatives(self) -> tuple[dict, int]:
    """({task: HardNegatives} of the tasks that have a table, loss.hard_negatives)."""
    k = int(self.config.loss.get("hard_negatives", 0))
    if k <= 0:
      return {}, 0
    override = self.config.data.get("hard_negatives_dir", "")
    tables = {}
    for task in self.tasks:
      store = self.stores[schema.TASK_ENTITY[task]]
      table = HardNegatives.load(self.prepared_dir, task, self.stores["queries"].size, store.size,
                                 override)
      if table is not None:
        tables[task] = table
    if not tables:
      raise FileNotFoundError(
          f"loss.hard_negatives={k} but no table in {table_dir(self.prepared_dir, override)} "
          "(<task>.parquet: judged negatives from prepare, or `launch.py mine`)")
    return tables, k

  def iterator(self) -> grain.DatasetIterator:
    ds = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if self.config.data.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.data.worker_count))
    return iter(ds)


def read_pairs(prepared_dir: str, split: str, task: str, max_pairs: int, seed: int,
               max_len: int, queries: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """All (or a seeded random `max_pairs` subset of) a split's pairs of one task, as arrays
  (queries: packed query rows, see DecodePair)."""
  source = grain.sources.ArrayRecordDataSource(shard_paths(prepared_dir, split, task))
  n = len(source)
  order = np.random.default_rng(seed).permutation(n)[:max_pairs] if max_pairs < n else np.arange(n)
  decode = DecodePair(max_len, queries)
  rows = [decode.map(source[int(i)]) for i in np.sort(order)]
  if not rows:
    raise ValueError(f"{split}/{task} has no pairs under {prepared_dir}")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
