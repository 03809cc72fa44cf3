"""Grain input pipeline of OmniSearchSage training: examples that carry their features, no
catalogue on any host.

The trainer's only input (trainer.py builds the files first with
feature_examples.ensure_feature_examples). Element k of the dataset is step k; per task it zips:

  examples: this host's slice of the task's global batch k of the chunk-shuffled (reseeded every
            epoch), repeated example shards, read in one batched read, decoded and padded as one
            batch (+ a sample of each row's hard negatives)
  negatives: this host's slice of the k-th run of the pre-shuffled entity stream, read the same
            way (and, with tasks.compat, of the stream of entities that have a legacy vector)

then each element becomes {task: batch}. The global batch holds a fixed number of pairs per task
(the task mix sets task influence, SPEC §1: the official code splits each batch 8:4:2:2).

The shuffle is a shuffle of chunks (ChunkShuffle): the examples are stored RECORDS_PER_CHUNK to an
ArrayRecord chunk, each shard already shuffled when written (feature_examples.example_order), and
every epoch visits the task's full chunks in a fresh order (Grain's index shuffle, seed + 1000 i
for the i-th trained task), a chunk's records one after another; the last, partial chunk closes
the epoch. A reader then decodes each chunk it touches once, and holds an index entry per chunk, not
per example, so the host's memory does not grow with the number of examples. This is the block
shuffle of pre-shuffled files that large input pipelines use; the price is that the records of a
chunk share a batch in every epoch (tests/test_feature_examples.py checks batches against the
entity tables and the pair shards through both orders). Reading a batch's
records in one call (ArrayRecord reads each shard's share in one go, the shards in parallel) and
decoding and padding them as arrays, not record by record, keeps the host's time per batch small
(docs/scale_out.md).

Shared random negatives (SPEC "Mixed negatives", Yang et al. 2020): global step k reads records
[k*n, (k+1)*n) of the stream (n = loss.random_negatives, wrapping around), host h the h-th slice
of them, so every host of a step draws the same negatives and reads only its own. A stream read in
order is a sample without replacement within each pass, so an entity's expected draws per step are
n/N and `neg_log_q` is log(n/N), the same quantity the in-batch correction uses for batch items
(SPEC: log Q = log count - log total + log B). Compatibility negatives come from the entities that
HAVE a legacy vector, i.e. from the old index.

Several hosts: a host reads only its rows of each global batch, and the hosts' rows, in host
order, are exactly the batch one host would read alone, so the global batch does not depend on the
number of hosts (tests/test_multihost.py). Everything is a function of the element index (the
hard-negative sample is seeded by the example's position in the shuffled stream, before the
per-host split), and that index is the Grain iterator state in each checkpoint: resume is exact.

Usage:
  feature_examples.ensure_feature_examples(config, prepared_dir)   # builds them if stale
  data = FeatureTrainData(config, prepared_dir)
  it = data.iterator()
"""

import grain
import jax
import numpy as np
from grain.experimental import ZipMapDataset

from omnisage.data.omnisearchsage import feature_examples, schema
from omnisage.data.omnisearchsage.entity_store import continuous_vectors
from omnisage.data.omnisearchsage.pipeline import shard_paths, task_batch_sizes
from omnisage.data.omnisearchsage.query_input import lexical_len

STEPS_LIMIT = 1 << 40  # steps per stream: far beyond any run


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The positions starts[i] .. starts[i] + lengths[i] - 1 of every run, one run after another."""
  lengths = np.asarray(lengths, np.int64)
  firsts = np.cumsum(lengths) - lengths   # where each run begins in the output
  return np.repeat(np.asarray(starts, np.int64) - firsts, lengths) + np.arange(lengths.sum())


def _pad_ragged(values: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
  """[n, width] int32: row i is the i-th run of `values`, cropped or right-padded with 0."""
  lengths = np.asarray(lengths, np.int64)
  columns = np.arange(width)
  keep = columns < lengths[:, None]
  out = np.zeros((len(lengths), width), np.int32)
  out[keep] = values[((np.cumsum(lengths) - lengths)[:, None] + columns)[keep]]
  return out


def select_rows(arrays: dict, prefix: str, take: np.ndarray) -> dict:
  """Rows `take` of a block of entities, as a block of its own."""
  take = np.asarray(take, np.int64)
  out = {}
  for name, lengths in (("tokens", "lengths"), ("fields", "lengths"),
                        ("lexical", "lexical_lengths")):
    key = f"{prefix}_{name}"
    if key in arrays:
      lengths = np.asarray(arrays[f"{prefix}_{lengths}"], np.int64)
      starts = np.cumsum(lengths) - lengths
      out[key] = arrays[key][_runs(starts[take], lengths[take])]
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
    out[f"{dst}_legacy"] = arrays[f"{src}_legacy"]
    out[f"{dst}_has_legacy"] = arrays[f"{src}_has_legacy"]
  return out


def read_records(source, keys: list[int]) -> list[bytes]:
  """Records `keys` of a data source. ArrayRecord's reads them in one call per shard, the shards
  in parallel (a tenth of the time of one read per record); a source without batched reads (a
  test's wrapper) is read record by record."""
  read = getattr(source, "__getitems__", None)
  return list(read(keys)) if read is not None else [source[key] for key in keys]


class ChunkShuffle:
  """Position -> record of a repeated stream of `count` records stored in chunks of `chunk`:
  epoch e (positions [e count, (e+1) count)) visits the count // chunk full chunks in the e-th
  order of Grain's index shuffle (seeded by `seed`, reseeded every epoch by repeat()), each
  chunk's records in order, then the last count % chunk records."""

  def __init__(self, count: int, chunk: int, seed: int):
    self.count, self.chunk = count, chunk
    self.full = count // chunk
    self.chunks = (grain.MapDataset.range(self.full).seed(seed).shuffle().repeat()
                   if self.full else None)

  def __getitem__(self, position: int) -> int:
    epoch, offset = divmod(int(position), self.count)
    if offset >= self.full * self.chunk:   # the partial chunk
      return offset
    index, within = divmod(offset, self.chunk)
    return self.chunks[epoch * self.full + index] * self.chunk + within


class HostBatches(grain.transforms.Map):
  """Step k -> this host's rows of a stream's global batch k, read and decoded together.

  A global batch is `rows * hosts` consecutive elements of the stream and host h's rows are its
  h-th slice, as `ds.batch(rows)[h::hosts]` would take them; only this host's records are read.
  """

  def __init__(self, source, rows: int, host: int, hosts: int):
    self.source, self.rows, self.host, self.hosts = source, rows, host, hosts

  def positions(self, step: int) -> range:
    first = (step * self.hosts + self.host) * self.rows
    return range(first, first + self.rows)

  def read(self, keys: list[int]) -> tuple[dict, dict]:
    if not keys:   # no row (loss.random_negatives = 0): the stream's arrays, empty
      arrays, counts = feature_examples.decode_batch(read_records(self.source, [0]))
      return {k: v[:0] for k, v in arrays.items()}, {k: c[:0] for k, c in counts.items()}
    return feature_examples.decode_batch(read_records(self.source, keys))


class ExampleBatches(HostBatches):
  """A task's examples: query_tokens, query_ids, pos_ids, pos_* and, with hard_k > 0,
  hard_ids/hard_valid/hard_* ([rows, hard_k] slots; empty slots are zeros, invalid).

  `order` maps a position to its record (ChunkShuffle). The hard-negative sample
  of position i draws from Philox(seed) at counter i: the generator Grain's `random_map` hands
  element i, so the sample depends on the position alone (not on the hosts or the batching).
  """

  def __init__(self, source, order: ChunkShuffle, rows: int, host: int, hosts: int,
               kind: str, widths: Widths, hard_k: int = 0, seed: int = 0):
    super().__init__(source, rows, host, hosts)
    self.order, self.kind, self.widths, self.hard_k, self.seed = order, kind, widths, hard_k, seed

  def map(self, step: int) -> dict:
    positions = self.positions(step)
    arrays, counts = self.read([self.order[i] for i in positions])
    batch = {"query_tokens": entity_inputs(arrays, "query", "query", "queries",
                                           self.widths)["query_tokens"],
             "query_ids": arrays["query_ids"], "pos_ids": arrays["pos_ids"]}
    batch.update(entity_inputs(arrays, "pos", "pos", self.kind, self.widths))
    if self.hard_k:
      batch.update(self._hard(arrays, counts, positions))
    return batch

  def _hard(self, arrays: dict, counts: dict, positions: range) -> dict:
    k, n = self.hard_k, len(positions)
    if "hard_ids" in arrays:   # the task has a table (a row's block may be empty)
      have = counts["hard_ids"]
      takes = [np.arange(h) if h <= k else np.sort(
                   np.random.Generator(np.random.Philox(self.seed, counter=[0, 0, 0, i]))
                   .choice(h, k, replace=False))
               for i, h in zip(positions, have.tolist())]
      first = np.cumsum(have) - have
      block = select_rows(arrays, "hard", np.concatenate(
          [first[r] + take for r, take in enumerate(takes)]))
      chosen = np.minimum(have, k)
    else:
      block, chosen = self._empty(), np.zeros(n, np.int64)
    slots = _runs(np.arange(n) * k, chosen)   # row r's negatives in its first chosen[r] slots
    out = {"hard_ids": np.zeros((n, k), np.int32),
           "hard_valid": np.arange(k) < chosen[:, None]}
    out["hard_ids"].reshape(-1)[slots] = block["hard_ids"]
    for key, value in entity_inputs(block, "hard", "hard", self.kind, self.widths,
                                    legacy=False).items():
      full = np.zeros((n * k,) + value.shape[1:], value.dtype)
      full[slots] = value
      out[key] = full.reshape((n, k) + value.shape[1:])
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


class EntityBatches(HostBatches):
  """The random (or compatibility) negatives (neg_ids, neg_tokens, ...): global step k takes
  the stream's records [k*n, (k+1)*n), wrapping around; one contiguous run per host."""

  def __init__(self, source, rows: int, host: int, hosts: int, kind: str, widths: Widths,
               compat: bool = False):
    super().__init__(source, rows, host, hosts)
    self.size, self.kind, self.widths, self.compat = len(source), kind, widths, compat

  def map(self, step: int) -> dict:
    arrays, _ = self.read([i % self.size for i in self.positions(step)])
    if self.compat:
      return {"compat_neg_ids": arrays["entity_ids"], "compat_neg_legacy": arrays["entity_legacy"]}
    # The legacy vectors of random negatives are not used: compat tasks have their own.
    return {"neg_ids": arrays["entity_ids"],
            **entity_inputs(arrays, "entity", "neg", self.kind, self.widths, legacy=False)}


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

  def _source(self, part: str, name: str):
    return grain.sources.ArrayRecordDataSource(shard_paths(self.directory, part, name))

  def _steps(self, batches: HostBatches) -> grain.MapDataset:
    # Element k is step k; every stream is cut to the same (practically endless) number of steps:
    # the zip needs equal lengths.
    return grain.MapDataset.range(STEPS_LIMIT).map(batches)

  def dataset(self) -> grain.MapDataset:
    cfg, parents, layout = self.config, [], []
    host, hosts = self.process_index, self.process_count
    n = int(cfg.loss.random_negatives)
    negatives = self._per_host(n, "loss.random_negatives")
    for i, task in enumerate(self.tasks):
      kind = schema.TASK_ENTITY[task]
      source = self._source("train", task)
      # Reseeded every epoch; a function of (seed, task, position) alone.
      order = ChunkShuffle(len(source), feature_examples.RECORDS_PER_CHUNK, cfg.seed + 1000 * i)
      rows = self._per_host(cfg.tasks[task], f"tasks.{task}")
      parents += [
          self._steps(ExampleBatches(source, order, rows, host, hosts, kind, self.widths,
                                     self.hard_k, seed=cfg.seed + 1000 * i + 17)),
          self._steps(EntityBatches(self._source("negatives", kind), negatives, host, hosts,
                                    kind, self.widths))]
      log_q = {"neg_log_q": np.log(max(n, 1) / self.meta["negatives"][kind])}   # n = 0: unused
      if cfg.tasks.compat and kind in self.meta["compat"]:
        pool = self.meta["compat"][kind]
        if not pool:
          raise ValueError(f"tasks.compat needs {kind} with a legacy vector; there are none")
        parents.append(self._steps(EntityBatches(self._source("compat", kind), negatives, host,
                                                 hosts, kind, self.widths, compat=True)))
        log_q["compat_neg_log_q"] = np.log(max(n, 1) / pool)
      layout.append((task, len(parents) - sum(c for _, c, _ in layout), log_q))
    return ZipMapDataset(parents=parents).map(Assemble(layout))

  def iterator(self) -> grain.DatasetIterator:
    ds = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if self.config.data.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.data.worker_count))
    return iter(ds)

