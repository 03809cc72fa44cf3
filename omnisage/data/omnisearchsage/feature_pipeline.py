"""Grain input pipeline over examples that carry their features: no catalogue on any host.

The catalogue-free twin of pipeline.TrainData (`data.feature_examples = True`); it yields batches
with the same keys, shapes and dtypes, from the files of feature_examples.py. Per task:

  examples: ArrayRecord shards -> shuffle (reseeded every epoch) -> repeat -> decode + pad (+ a
            sample of the row's hard negatives) -> batch(pairs per host) -> this host's batches
  negatives: the pre-shuffled entity stream -> repeat -> decode + pad -> batch(negatives per host)
            -> this host's batches (and, with tasks.compat, the stream of entities that have a
            legacy vector)

then the streams are zipped and each element becomes the task's batch. The examples are shuffled
exactly as TrainData shuffles the pair shards (same seeds, same record order), so both pipelines
see the same pairs in the same order; only the random negatives differ.

Shared random negatives: global step k reads records [k*n, (k+1)*n) of the stream (n =
loss.random_negatives, wrapping around), host h the h-th slice of them, so every host of a step
draws the same negatives and reads only its own. A stream read in order is a sample without
replacement within each pass, so an entity's expected draws per step are n/N and `neg_log_q` is
log(n/N), as in TrainData.

Everything is a function of the element index (the hard-negative sample is seeded by the
example's position in the shuffled stream, before the per-host split, so it does not depend on
the number of hosts), and that index is the Grain iterator state in each checkpoint: resume is
exact.

Usage:
  data = FeatureTrainData(config, prepared_dir)   # after feature_examples.write_feature_examples
  it = data.iterator()
"""

import grain
import jax
import numpy as np
from grain.experimental import ZipMapDataset

from omnisage.data.omnisearchsage import feature_examples, schema
from omnisage.data.omnisearchsage.entity_store import continuous_vectors
from omnisage.data.omnisearchsage.pipeline import STEPS_LIMIT, shard_paths, task_batch_sizes
from omnisage.data.omnisearchsage.query_input import lexical_len


def _pad_ragged(values: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
  """[n, width] int32: row i is the i-th run of `values`, cropped or right-padded with 0."""
  out = np.zeros((len(lengths), width), np.int32)
  start = 0
  for i, length in enumerate(lengths):
    keep = min(int(length), width)
    out[i, :keep] = values[start:start + keep]
    start += int(length)
  return out


def select_rows(arrays: dict, prefix: str, take: np.ndarray) -> dict:
  """Rows `take` of a block of entities, as a block of its own."""
  out = {}
  for name, lengths in (("tokens", "lengths"), ("fields", "lengths"),
                        ("lexical", "lexical_lengths")):
    key = f"{prefix}_{name}"
    if key in arrays:
      ends = np.cumsum(arrays[f"{prefix}_{lengths}"])
      starts = ends - arrays[f"{prefix}_{lengths}"]
      out[key] = np.concatenate([arrays[key][:0]] + [arrays[key][starts[i]:ends[i]] for i in take])
  for name in ("ids", "lengths", "lexical_lengths", "legacy", "has_legacy", "visual"):
    if f"{prefix}_{name}" in arrays:
      out[f"{prefix}_{name}"] = arrays[f"{prefix}_{name}"][take]
  return out


class Widths:
  """The padded widths of the model inputs (the same as EntityStore.load's for the config)."""

  def __init__(self, config):
    self.entity = int(config.data.max_entity_tokens)
    self.query = int(config.data.batch_query_len)
    self.lexical = lexical_len(config)


def entity_inputs(arrays: dict, src: str, dst: str, kind: str, widths: Widths,
                  legacy: bool = True) -> dict:
  """The padded model inputs of a block of entities (feature_examples.py's layout), keyed
  `<dst>_tokens`, ... as EntityStore.gather keys them."""
  tokens = _pad_ragged(arrays[f"{src}_tokens"], arrays[f"{src}_lengths"],
                       widths.query if kind == "queries" else widths.entity)
  if kind == "queries":
    if widths.lexical:
      if f"{src}_lexical" not in arrays:
        raise ValueError("the feature examples have no query n-grams (model.query.lexical needs "
                         "them): rerun `launch.py prepare`, then write_feature_examples")
      tokens = np.concatenate([tokens, _pad_ragged(arrays[f"{src}_lexical"],
                                                   arrays[f"{src}_lexical_lengths"],
                                                   widths.lexical)], 1)
    return {f"{dst}_tokens": tokens}
  out = {f"{dst}_tokens": tokens,
         f"{dst}_fields": _pad_ragged(arrays[f"{src}_fields"], arrays[f"{src}_lengths"],
                                      widths.entity),
         f"{dst}_continuous": continuous_vectors(kind, arrays[f"{src}_legacy"],
                                                 arrays[f"{src}_visual"])}
  if legacy:
    out[f"{dst}_legacy"] = arrays[f"{src}_legacy"].copy()
    out[f"{dst}_has_legacy"] = arrays[f"{src}_has_legacy"].copy()
  return out


class DecodeExample(grain.transforms.RandomMap):
  """Example record -> one row of a task's batch: query_tokens, query_ids, pos_ids, pos_* and,
  with hard_k > 0, hard_ids/hard_valid/hard_* ([hard_k] slots; empty slots are zeros, invalid)."""

  def __init__(self, kind: str, widths: Widths, hard_k: int = 0):
    self.kind, self.widths, self.hard_k = kind, widths, hard_k

  def random_map(self, record: bytes, rng: np.random.Generator) -> dict:
    arrays = feature_examples.decode_arrays(record)
    query = entity_inputs(arrays, "query", "query", "queries", self.widths)
    row = {"query_tokens": query["query_tokens"][0], "query_ids": arrays["query_ids"][0],
           "pos_ids": arrays["pos_ids"][0]}
    row.update({k: v[0] for k, v in entity_inputs(arrays, "pos", "pos", self.kind,
                                                  self.widths).items()})
    if self.hard_k:
      row.update(self._hard(arrays, rng))
    return row

  def _hard(self, arrays: dict, rng: np.random.Generator) -> dict:
    k = self.hard_k
    if "hard_ids" in arrays:   # the task has a table (the block may have no rows)
      have = len(arrays["hard_ids"])
      take = np.arange(have) if have <= k else np.sort(rng.choice(have, k, replace=False))
      block = select_rows(arrays, "hard", take)
    else:
      block = self._empty()
    chosen = len(block["hard_ids"])
    out = {"hard_ids": np.zeros(k, np.int32), "hard_valid": np.arange(k) < chosen}
    out["hard_ids"][:chosen] = block["hard_ids"]
    for key, value in entity_inputs(block, "hard", "hard", self.kind, self.widths,
                                    legacy=False).items():   # padded to k slots
      out[key] = np.zeros((k,) + value.shape[1:], value.dtype)
      out[key][:chosen] = value
    return out

  def _empty(self) -> dict:
    empty = {"hard_ids": np.zeros(0, np.int32), "hard_lengths": np.zeros(0, np.int32),
             "hard_tokens": np.zeros(0, np.int32)}
    if self.kind == "queries":
      return {**empty, "hard_lexical_lengths": np.zeros(0, np.int32),
              "hard_lexical": np.zeros(0, np.int32)}
    return {**empty, "hard_fields": np.zeros(0, np.int8),
            "hard_legacy": np.zeros((0, schema.LEGACY_DIM), np.float32),
            "hard_has_legacy": np.zeros(0, bool),
            "hard_visual": np.zeros((0, schema.VISUAL_DIM), np.float16)}


class DecodeEntity(grain.transforms.Map):
  """Entity-stream record -> one random (or compatibility) negative, keyed as TrainData keys it."""

  def __init__(self, kind: str, widths: Widths, compat: bool = False):
    self.kind, self.widths, self.compat = kind, widths, compat

  def map(self, record: bytes) -> dict:
    arrays = feature_examples.decode_arrays(record)
    if self.compat:
      return {"compat_neg_ids": arrays["entity_ids"][0],
              "compat_neg_legacy": arrays["entity_legacy"][0].copy()}
    # The legacy vectors of random negatives are not used: compat tasks have their own.
    row = {"neg_ids": arrays["entity_ids"][0]}
    row.update({k: v[0] for k, v in entity_inputs(arrays, "entity", "neg", self.kind,
                                                  self.widths, legacy=False).items()})
    return row


class Assemble(grain.transforms.Map):
  """The zipped (examples, negatives[, compat negatives]) of every task -> {task: batch}."""

  def __init__(self, layout: list[tuple[str, int, dict]]):
    self.layout = layout   # (task, number of parent streams, {key: log Q of its draws})

  def map(self, parts: tuple) -> dict:
    out, i = {}, 0
    for task, count, log_q in self.layout:
      batch = {}
      for part in parts[i:i + count]:
        batch.update(part)
      for key, value in log_q.items():
        batch[key] = np.full(len(batch[key.replace("log_q", "ids")]), value, np.float32)
      out[task] = batch
      i += count
    return out


class FeatureTrainData:
  """The training input pipeline of one host, over <prepared>/feature_examples."""

  def __init__(self, config, prepared_dir: str, process_index: int | None = None,
               process_count: int | None = None):
    self.config = config
    self.directory = feature_examples.directory_of(prepared_dir)
    self.meta = feature_examples.read_meta(prepared_dir)
    self.tasks = list(task_batch_sizes(config))
    self.widths = Widths(config)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.hard_k = int(config.loss.get("hard_negatives", 0))
    if self.hard_k > 0 and not set(self.meta["hard_negatives"]) & set(self.tasks):
      raise FileNotFoundError(
          f"loss.hard_negatives={self.hard_k} but {self.directory} was built without a "
          "hard-negatives table: add <task>.parquet (prepare's judged negatives or `launch.py "
          "mine`), then rebuild it (feature_examples.write_feature_examples)")

  def _per_host(self, global_count: int, what: str) -> int:
    if global_count % self.process_count:
      raise ValueError(f"{what}={global_count} is not divisible by {self.process_count} hosts")
    return global_count // self.process_count

  def _host_batches(self, ds: grain.MapDataset, rows: int) -> grain.MapDataset:
    ds = ds.batch(rows, drop_remainder=True)
    # This host's rows of every global batch (MapDatasets are lazy: other rows are never read),
    # cut to one length for the zip, as in TrainData.
    return ds[self.process_index::self.process_count][:STEPS_LIMIT]

  def _stream(self, part: str, kind: str, rows: int, decode) -> grain.MapDataset:
    source = grain.sources.ArrayRecordDataSource(shard_paths(self.directory, part, kind))
    return self._host_batches(grain.MapDataset.source(source).repeat().map(decode), rows)

  def dataset(self) -> grain.MapDataset:
    cfg, parents, layout = self.config, [], []
    n = int(cfg.loss.random_negatives)
    negatives = self._per_host(n, "loss.random_negatives")
    for i, task in enumerate(self.tasks):
      kind = schema.TASK_ENTITY[task]
      source = grain.sources.ArrayRecordDataSource(shard_paths(self.directory, "train", task))
      # The same seed and chain as TrainData's shuffle: the same pairs in the same order.
      ds = grain.MapDataset.source(source).seed(cfg.seed + 1000 * i).shuffle().repeat()
      decode = DecodeExample(kind, self.widths, self.hard_k)
      ds = ds.random_map(decode, seed=cfg.seed + 1000 * i + 17)
      parents += [self._host_batches(ds, self._per_host(cfg.tasks[task], f"tasks.{task}")),
                  self._stream("negatives", kind, negatives, DecodeEntity(kind, self.widths))]
      log_q = {"neg_log_q": np.log(n / self.meta["negatives"][kind])}
      if cfg.tasks.compat and kind in self.meta["compat"]:
        pool = self.meta["compat"][kind]
        if not pool:
          raise ValueError(f"tasks.compat needs {kind} with a legacy vector; there are none")
        parents.append(self._stream("compat", kind, negatives,
                                    DecodeEntity(kind, self.widths, compat=True)))
        log_q["compat_neg_log_q"] = np.log(n / pool)
      layout.append((task, len(parents) - sum(c for _, c, _ in layout), log_q))
    return ZipMapDataset(parents=parents).map(Assemble(layout))

  def iterator(self) -> grain.DatasetIterator:
    ds = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if self.config.data.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.data.worker_count))
    return iter(ds)

