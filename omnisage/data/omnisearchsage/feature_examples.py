"""Training examples that carry their features: the files the catalogue-free pipeline streams.

Production training data is denormalised: each row already holds the features of its query and
its positive, so the trainer reads rows and never looks an entity up. This step builds such rows
in a prepared directory: `prepare` writes them last, training rebuilds them when missing or stale
(an older prepared dir, a changed hard-negatives table), and `launch.py mine` rebuilds them after
writing the hard negatives they embed:

  <prepared>/feature_examples/
    meta.json                       counts, the settings they were built with, and the size and
                                    mtime of every input file (a changed input means a rebuild)
    train/<task>/shard-*.array_record     one example per training pair: shard i holds the
                                    pairs of pair shard i, in a seeded shuffled order
                                    (record j is pair record example_order(...)[j])
    negatives/<kind>/shard-*.array_record one entity per record, in a shuffled order: the stream
                                    the shared random negatives are read from
    compat/<kind>/shard-*.array_record    the same, only the entities that have a legacy vector
                                    (pins, products): the compatibility tasks' negatives

The examples and the streams are written RECORDS_PER_CHUNK records to an ArrayRecord chunk. A
reader holds an index entry of a few tens of bytes per chunk, so one record per chunk would make the
training host's memory grow with the number of examples; the pipeline reads whole chunks (a shuffle
of chunks, contiguous runs of a stream: feature_pipeline.py), so larger chunks decode nothing more.
Shuffling each shard as it is written makes every chunk a random sample of its pair shard.

A record is a few named arrays (`encode_arrays`). Entity features are stored unpadded, in blocks
of n entities under a prefix (`query`, `pos`, `hard`, `entity`):

  <p>_ids [n] int32, <p>_lengths [n] int32, <p>_tokens [sum lengths] int32
  pins/products:  <p>_fields [sum lengths] int8, <p>_legacy [n, 256] float32 (zeros where
                  missing), <p>_has_legacy [n] bool, <p>_visual [n, 1024] float16 (zeros)
  queries:        <p>_lexical_lengths [n] int32, <p>_lexical [sum] int32 (n-gram ids)

An example is the blocks `query` (1 row), `pos` (1 row) and, when the task has a hard-negatives
table (hard_negatives.py), `hard`: its query's hard negatives other than the positive, at most
HARD_KEPT (a seeded sample beyond that); the pipeline samples `loss.hard_negatives` of them per
row. Padding and cropping to the config's widths happen when a batch is read
(feature_pipeline.py), so one set of files serves every width.

Usage:
  write_feature_examples(config, prepared_dir)        # builds <prepared>/feature_examples
  directory = ensure_feature_examples(config, prepared_dir)   # builds it only when stale
"""

import glob
import json
import logging
import math
import os
import shutil
import struct
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_store import fixed_vectors
from omnisage.data.omnisearchsage.hard_negatives import HardNegatives, table_dir

log = logging.getLogger(__name__)

DIRNAME = "feature_examples"
VERSION = 3   # 2: hard-negative samples seeded per pair shard; 3: shuffled shards, 16-record chunks
HARD_KEPT = 32      # hard negatives kept per example (the pipeline samples loss.hard_negatives)
CHUNK = 4096        # entity table rows decoded at a time into the entity records
PREFETCH = 512      # pairs (or stream entities) whose entities are read from disk at a time
RECORDS_PER_CHUNK = 16   # records per ArrayRecord chunk of the examples and streams

# --- records: named arrays ----------------------------------------------------------------------
# u16 count; per array: u8 name length, u8 dtype code, u8 ndim, the name, u32 per dimension;
# then the arrays' little-endian bytes in the same order.
_DTYPES = tuple(np.dtype(s) for s in ("<i4", "|i1", "<f4", "<f2", "|b1", "<i8"))
_CODE = {d.str: i for i, d in enumerate(_DTYPES)}
_COUNT, _ENTRY = struct.Struct("<H"), struct.Struct("<BBB")


def encode_arrays(arrays: dict) -> bytes:
  head, body = [_COUNT.pack(len(arrays))], []
  for name, value in arrays.items():
    value = np.ascontiguousarray(value)
    if value.dtype.str not in _CODE:
      raise TypeError(f"{name}: dtype {value.dtype} cannot be stored")
    key = name.encode()
    head.append(_ENTRY.pack(len(key), _CODE[value.dtype.str], value.ndim) + key +
                struct.pack(f"<{value.ndim}I", *value.shape))
    body.append(value.tobytes())
  return b"".join(head + body)


def decode_arrays(record: bytes) -> dict:
  (count,), pos, entries = _COUNT.unpack_from(record, 0), _COUNT.size, []
  for _ in range(count):
    length, code, ndim = _ENTRY.unpack_from(record, pos)
    pos += _ENTRY.size
    name = record[pos:pos + length].decode()
    pos += length
    shape = struct.unpack_from(f"<{ndim}I", record, pos)
    pos += 4 * ndim
    entries.append((name, _DTYPES[code], shape))
  out = {}
  for name, dtype, shape in entries:
    size = math.prod(shape)
    out[name] = np.frombuffer(record, dtype, size, pos).reshape(shape)
    pos += size * dtype.itemsize
  return out


def join_records(parts: list[tuple[str, bytes]]) -> bytes:
  """encode_arrays of the union of records whose array names all start with "entity", each
  renamed to its prefix (("pos", r): "entity_tokens" -> "pos_tokens"), in the parts' order,
  without decoding an array: the bytes of encode_arrays({**pos arrays, **hard arrays, ...})."""
  heads, bodies, count = [], [], 0
  for prefix, record in parts:
    (n,), pos = _COUNT.unpack_from(record, 0), _COUNT.size
    key = prefix.encode()
    for _ in range(n):
      length, code, ndim = _ENTRY.unpack_from(record, pos)
      start = pos + _ENTRY.size
      name = record[start:start + length]
      if not name.startswith(b"entity"):
        raise ValueError(f"join_records: array {name!r} is not an entity array")
      new = key + name[len(b"entity"):]
      heads.append(_ENTRY.pack(len(new), code, ndim) + new +
                   record[start + length:start + length + 4 * ndim])
      pos = start + length + 4 * ndim
    bodies.append(record[pos:])
    count += n
  return b"".join([_COUNT.pack(count)] + heads + bodies)


def _header(record: bytes) -> tuple[int, list, list]:
  """(header bytes, [(name, dtype, ndim)], [offset of each shape u32]) of a record."""
  (count,), pos, entries, dims = _COUNT.unpack_from(record, 0), _COUNT.size, [], []
  for _ in range(count):
    length, code, ndim = _ENTRY.unpack_from(record, pos)
    pos += _ENTRY.size
    entries.append((record[pos:pos + length].decode(), _DTYPES[code], ndim))
    pos += length
    dims += range(pos, pos + 4 * ndim, 4)
    pos += 4 * ndim
  return pos, entries, dims


def decode_batch(records: list[bytes]) -> tuple[dict, dict]:
  """Records that hold the same names, dtypes and ranks (those of one stream or task) ->
  ({name: the records' arrays concatenated along axis 0}, {name: [records] int64, each record's
  length along axis 0}).

  Concatenated blocks are blocks: the tokens of rows [a, b) are still runs of `<p>_tokens` in row
  order. The headers are then the same bytes but for the shapes, so they are read as one array,
  and each array is gathered with one join, instead of a Python decode per record. The arrays
  are writable (their own buffers).
  """
  size, entries, dims = _header(records[0])
  lengths = np.fromiter(map(len, records), np.int64, len(records))
  if lengths.min() < size:
    raise ValueError("records of different layouts cannot be decoded as one batch")
  heads = np.frombuffer(b"".join([r[:size] for r in records]), np.uint8).reshape(len(records), size)
  fixed = np.ones(size, bool)
  for d in dims:
    fixed[d:d + 4] = False
  if not (heads[:, fixed] == heads[0, fixed]).all():
    raise ValueError("records of different layouts cannot be decoded as one batch")
  columns = np.asarray([d + i for d in dims for i in range(4)], np.int64)
  shapes = np.ascontiguousarray(heads[:, columns]).view("<u4").astype(np.int64)
  sizes, i = [], 0
  for _, dtype, ndim in entries:
    sizes.append(shapes[:, i:i + ndim].prod(1) * dtype.itemsize)
    i += ndim
  nbytes = np.stack(sizes, 1)                             # [records, arrays]
  starts = size + np.cumsum(nbytes, 1) - nbytes           # within each record
  if not np.array_equal(size + nbytes.sum(1), lengths):
    raise ValueError("a record's length does not match its header")
  views = [memoryview(r) for r in records]
  out, rows, i = {}, {}, 0
  for j, (name, dtype, ndim) in enumerate(entries):
    trailing = shapes[:, i + 1:i + ndim]
    if ndim > 1 and not (trailing == trailing[0]).all():
      raise ValueError(f"{name}: the records' arrays differ beyond axis 0")
    data = bytearray().join([v[a:a + n] for v, a, n in zip(views, starts[:, j].tolist(),
                                                    nbytes[:, j].tolist())])
    out[name] = np.frombuffer(data, dtype).reshape((-1, *trailing[0].tolist()) if ndim else -1)
    rows[name] = shapes[:, i] if ndim else np.ones(len(records), np.int64)
    i += ndim
  return out, rows


# --- entity features, unpadded ------------------------------------------------------------------
class _Ragged:
  """A list column as offsets + values (row i: values[offsets[i]:offsets[i+1]])."""

  def __init__(self, column, dtype):
    column = column.combine_chunks()
    self.offsets = column.offsets.to_numpy().astype(np.int64)
    self.values = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

  def rows(self, idx) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n] int32, concatenated values) of rows idx."""
    parts = [self.values[self.offsets[i]:self.offsets[i + 1]] for i in idx]
    lengths = np.asarray([len(p) for p in parts], np.int32)
    return lengths, (np.concatenate(parts) if parts else self.values[:0])


class _TableRows:
  """The rows of (a batch of) one entity table, decoded as the records store them."""

  def __init__(self, table: pa.Table, kind: str):
    self.kind, self.size = kind, table.num_rows
    self.index = table.column("entity_index").to_numpy()
    self.tokens = _Ragged(table.column("tokens"), np.int32)
    self.lexical = self.fields = self.legacy = self.has_legacy = None
    if kind == "queries":
      if "lexical" in table.column_names:
        self.lexical = _Ragged(table.column("lexical"), np.int32)
      return
    self.fields = _Ragged(table.column("fields"), np.int8)
    self.legacy, self.has_legacy = fixed_vectors(table.column("legacy"), schema.LEGACY_DIM)
    visual, _ = fixed_vectors(table.column("visual"), schema.VISUAL_DIM)
    self.visual = visual.astype(np.float16)   # as EntityStore holds it

  def block(self, rows, prefix: str) -> dict:
    """The block of these rows (positions in the table), their ids the rows' entity_index."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    lengths, tokens = self.tokens.rows(rows)
    out = {f"{prefix}_ids": self.index[rows].astype(np.int32), f"{prefix}_lengths": lengths,
           f"{prefix}_tokens": tokens}
    if self.kind == "queries":
      if self.lexical is not None:
        out[f"{prefix}_lexical_lengths"], out[f"{prefix}_lexical"] = self.lexical.rows(rows)
      return out
    out[f"{prefix}_fields"] = self.fields.rows(rows)[1]
    out.update({f"{prefix}_legacy": self.legacy[rows], f"{prefix}_has_legacy":
                self.has_legacy[rows], f"{prefix}_visual": self.visual[rows]})
    return out


def write_entity_records(prepared_dir: str, kind: str, cache_dir: str) -> np.ndarray:
  """<cache_dir>/<kind>.array_record: record i is entity i's block under the prefix "entity",
  written streaming the Parquet table CHUNK rows at a time. Returns has_legacy [N] bool (all
  False for queries), which the compatibility streams select by."""
  path = os.path.join(prepared_dir, "entities", f"{kind}.parquet")
  source = pq.ParquetFile(path)
  has_legacy = np.zeros(source.metadata.num_rows, bool)
  writer, start = ArrayRecordWriter(entity_records_path(cache_dir, kind), "group_size:1"), 0
  for batch in source.iter_batches(CHUNK):
    rows = _TableRows(pa.Table.from_batches([batch]), kind)
    if not np.array_equal(rows.index, np.arange(start, start + rows.size)):
      raise ValueError(f"{path}: entity_index must be 0..N-1 in row order")
    for i in range(rows.size):
      writer.write(encode_arrays(rows.block([i], "entity")))
    if rows.has_legacy is not None:
      has_legacy[start:start + rows.size] = rows.has_legacy
    start += rows.size
  writer.close()
  return has_legacy


def entity_records_path(cache_dir: str, kind: str) -> str:
  return os.path.join(cache_dir, f"{kind}.array_record")


class EntityRows:
  """One entity table's features as stored in the records (entity_index i), read by index from
  its entity records (write_entity_records), as a feature store serves them: building the
  examples holds no catalogue in memory, only the entities of the pairs at hand (`prefetch`)."""

  def __init__(self, prepared_dir: str, kind: str, cache_dir: str):
    self.kind = kind
    self.reader = ArrayRecordReader(entity_records_path(cache_dir, kind), "readahead_buffer_size:0")
    self.size = self.reader.num_records()
    schema_ = pq.read_schema(os.path.join(prepared_dir, "entities", f"{kind}.parquet"))
    self.empty = _TableRows(schema_.empty_table(), kind).block([], "entity")
    self.cache: dict = {}

  def prefetch(self, idx) -> None:
    """Reads the records of the entities idx in one call; `block` serves them until the next."""
    idx = np.unique(np.asarray(idx, np.int64)).tolist()
    self.cache = dict(zip(idx, self.reader.read(idx))) if idx else {}

  def record(self, i: int) -> bytes:
    """Entity i's record: its block([i], "entity"), encoded."""
    record = self.cache.get(i)
    return record if record is not None else self.reader.read([i])[0]

  def block(self, idx, prefix: str) -> dict:
    idx = np.asarray(idx, np.int64).reshape(-1)
    if len(idx):
      arrays, _ = decode_batch([self.record(i) for i in idx.tolist()])
    else:
      arrays = self.empty
    return {f"{prefix}{name[len('entity'):]}": value for name, value in arrays.items()}

  def close(self) -> None:
    self.reader.close()


# --- the directory ------------------------------------------------------------------------------
def directory_of(prepared_dir: str) -> str:
  return os.path.join(prepared_dir, DIRNAME)


def _inputs(config, prepared_dir: str) -> dict:
  """{path relative to prepared (or absolute for an override): [size, mtime_ns]} of every file the
  examples are built from."""
  paths = [os.path.join(prepared_dir, "entities", f"{k}.parquet") for k in schema.ENTITY_KINDS]
  paths += sorted(glob.glob(os.path.join(prepared_dir, "train", "*", "*.array_record")))
  hard = table_dir(prepared_dir, config.data.get("hard_negatives_dir", ""))
  paths += sorted(glob.glob(os.path.join(hard, "*.parquet")))
  out = {}
  for path in paths:
    stat = os.stat(path)
    out[os.path.relpath(path, prepared_dir)] = [stat.st_size, stat.st_mtime_ns]
  return out


def _settings(config) -> dict:
  return {"version": VERSION, "seed": int(config.seed), "hard_kept": HARD_KEPT,
          "hard_negatives_dir": config.data.get("hard_negatives_dir", "")}


def read_meta(prepared_dir: str) -> dict:
  path = os.path.join(directory_of(prepared_dir), "meta.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: build it with feature_examples."
                            "write_feature_examples(config, prepared_dir)")
  with open(path) as f:
    return json.load(f)


def is_current(config, prepared_dir: str) -> bool:
  """Whether the examples exist and were built from today's inputs with today's settings."""
  try:
    meta = read_meta(prepared_dir)
  except FileNotFoundError:
    return False
  return meta["settings"] == _settings(config) and meta["inputs"] == _inputs(config, prepared_dir)


def _write_records(path: str, records) -> int:
  writer, count = ArrayRecordWriter(path, f"group_size:{RECORDS_PER_CHUNK}"), 0
  for record in records:
    writer.write(record)
    count += 1
  writer.close()
  return count


def example_order(seed: int, task: str, shard: int, count: int) -> np.ndarray:
  """[count] int64: record j of example shard `shard` of `task` is the pair at this position of
  pair shard `shard` (a permutation seeded by (seed, task, shard))."""
  return np.random.default_rng([seed, sorted(schema.TASK_ENTITY).index(task), shard, 1]
                               ).permutation(count)


def _pair_shard(seed: int, prepared_dir: str, task: str, shard: int, out: str, cache_dir: str,
                hard_dir: str) -> int:
  """Examples of pair shard `shard` of `task` -> the output shard of the same name, in the order
  example_order gives; the hard-negative samples are seeded by (seed, task, shard), so shards can
  be written in any order or in parallel."""
  kind = schema.TASK_ENTITY[task]
  paths = sorted(glob.glob(os.path.join(prepared_dir, "train", task, "*.array_record")))
  queries = EntityRows(prepared_dir, "queries", cache_dir)
  entities = EntityRows(prepared_dir, kind, cache_dir)
  hard = HardNegatives.load(prepared_dir, task, queries.size, entities.size, hard_dir)
  rng = np.random.default_rng([seed, sorted(schema.TASK_ENTITY).index(task), shard])
  # Read in order with a plain reader (not a Grain data source: what the trainer's data sources
  # serve is its training data alone).
  reader = ArrayRecordReader(paths[shard], "readahead_buffer_size:0")
  order = example_order(seed, task, shard, reader.num_records())

  def records():
    for start in range(0, len(order), PREFETCH):
      pairs = [schema.decode_pair(raw) for raw in reader.read(order[start:start + PREFETCH]
                                                              .tolist())]
      qs = [p["query_index"] for p in pairs]
      es = [p["entity_index"] for p in pairs]
      pools = [None] * len(pairs)
      if hard is not None:   # drawn in pair order, as the examples are written
        for n, (q, e) in enumerate(zip(qs, es)):
          pool = hard.entities[hard.offsets[q]:hard.offsets[q + 1]]
          pool = pool[pool != e]
          if len(pool) > HARD_KEPT:
            pool = np.sort(rng.choice(pool, HARD_KEPT, replace=False))
          pools[n] = pool
      queries.prefetch(qs)
      entities.prefetch(np.concatenate([es] + [p for p in pools if p is not None]))
      for q, e, pool in zip(qs, es, pools):
        parts = [("query", queries.record(q)), ("pos", entities.record(e))]
        if pool is not None:
          parts.append(("hard", encode_arrays(entities.block(pool, "entity"))))
        yield join_records(parts)
  try:
    return _write_records(os.path.join(out, "train", task, os.path.basename(paths[shard])),
                          records())
  finally:
    reader.close()
    queries.close()
    entities.close()


def _stream_shard(prepared_dir: str, kind: str, cache_dir: str, idx: np.ndarray, path: str) -> int:
  """One shard of an entity stream: the entities idx, in that order."""
  rows = EntityRows(prepared_dir, kind, cache_dir)

  def records():
    for start in range(0, len(idx), PREFETCH):
      chunk = idx[start:start + PREFETCH]
      rows.prefetch(chunk)
      for i in chunk.tolist():
        yield rows.record(i)
  try:
    return _write_records(path, records())
  finally:
    rows.close()


def _run_all(fn, calls: list[tuple]) -> list:
  """fn(*args) for each args of calls: as Ray tasks (one CPU each) on the Ray cluster this process
  has joined (prepare's), else one after the other here. The results are in the calls' order."""
  ray = sys.modules.get("ray")
  if ray is None or not ray.is_initialized() or len(calls) < 2:
    return [fn(*args) for args in calls]
  remote = ray.remote(num_cpus=1, max_retries=0)(fn)
  return ray.get([remote.remote(*args) for args in calls])


def write_feature_examples(config, prepared_dir: str) -> dict:
  """Builds <prepared>/feature_examples (replacing an older one whole); returns its meta.

  First each entity table becomes records by entity_index (write_entity_records); then every
  pair shard and every shard of the entity streams is written by its own call (Ray tasks when
  this process has joined Ray, as prepare has), each reading only the entities of PREFETCH pairs
  at a time: memory is a chunk per worker, whatever the number of pairs or entities.
  """
  final = directory_of(prepared_dir)
  out = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(out, ignore_errors=True)
  inputs = _inputs(config, prepared_dir)   # before reading: a file changed meanwhile is stale
  cache_dir = os.path.join(out, "entity_records")
  os.makedirs(cache_dir)
  kinds = list(schema.ENTITY_KINDS)
  has_legacy = dict(zip(kinds, _run_all(write_entity_records,
                                        [(prepared_dir, k, cache_dir) for k in kinds])))
  meta = {"settings": _settings(config), "inputs": inputs, "pairs": {}, "hard_negatives": [],
          "negatives": {}, "compat": {}}
  override = config.data.get("hard_negatives_dir", "")
  calls = []
  for task, kind in schema.TASK_ENTITY.items():
    shards = glob.glob(os.path.join(prepared_dir, "train", task, "*.array_record"))
    if not shards:
      continue
    os.makedirs(os.path.join(out, "train", task))
    if HardNegatives.load(prepared_dir, task, len(has_legacy["queries"]), len(has_legacy[kind]),
                          override) is not None:
      meta["hard_negatives"].append(task)
    calls += [(int(config.seed), prepared_dir, task, s, out, cache_dir, override)
              for s in range(len(shards))]
  for (_, _, task, *_), count in zip(calls, _run_all(_pair_shard, calls)):
    meta["pairs"][task] = meta["pairs"].get(task, 0) + count
  num_shards, calls = int(config.data.num_shards), []
  for i, kind in enumerate(kinds):
    # Shuffled once here; the pipeline reads the stream in order, so the negatives of a step are
    # a contiguous run of records (sequential reads) and still a uniform sample.
    order = np.random.default_rng([config.seed, 7919, i]).permutation(len(has_legacy[kind]))
    streams = {"negatives": order}
    if kind != "queries":
      streams["compat"] = order[has_legacy[kind][order]]
    for stream, idx in streams.items():
      directory = os.path.join(out, stream, kind)
      os.makedirs(directory)
      meta[stream][kind] = len(idx)
      for s, part in enumerate(np.array_split(idx, num_shards)):
        calls.append((prepared_dir, kind, cache_dir, part,
                      os.path.join(directory, schema.shard_name(s, num_shards))))
  _run_all(_stream_shard, calls)
  shutil.rmtree(cache_dir)
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  shutil.rmtree(final, ignore_errors=True)
  os.replace(out, final)
  log.info("feature examples: %s pairs, negatives %s -> %s", meta["pairs"], meta["negatives"],
           final)
  return meta


def ensure_feature_examples(config, prepared_dir: str, rebuild: bool = False) -> str:
  """Builds the examples of prepared_dir (on process 0, the others wait) when missing or stale,
  or always with `rebuild`; returns their directory.

  Training calls this before reading them: prepare wrote them, but a hard-negatives table added
  or changed since (or a prepared dir from before they existed) makes them stale. `rebuild` is
  for mine.py, which has just rewritten a table: one rewritten with the same size within the file
  system's mtime resolution would otherwise look current.
  """
  if jax.process_index() == 0 and (rebuild or not is_current(config, prepared_dir)):
    write_feature_examples(config, prepared_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("feature_examples")
  if not is_current(config, prepared_dir):
    raise FileNotFoundError(f"{directory_of(prepared_dir)} is missing or stale on process "
                            f"{jax.process_index()}: is {prepared_dir} shared by all hosts?")
  return directory_of(prepared_dir)
