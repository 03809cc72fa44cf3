"""Raw Parquet tables as Ray Data blocks with global row numbers, and the block-level helpers of
`launch.py prepare` on Ray Data (prepare.py).

Reading: a raw table is validated one block per Parquet row group, or per slice of one when the
file has fewer row groups than the cluster has CPUs or a row group is bigger than a block may be
(`block_units`): a task's memory is bounded by the block, never by the table. Ray's read_parquet
gives no row numbers, and prepare's rules need them ("the first valid row of an id wins", the
dense entity_index, pairs in log order), so a block here is read in a task and knows its first
global row (`read_row_groups`).

A validation function turns a block into its valid rows plus one summary row per bad-row reason
(`summary_rows`); `read_validated` splits them again and sums the counts over blocks (a few rows
per block, summed on the driver), so prepare's bad-row table is exact however the table is cut.

A defect that prepare reports as a ValueError while reading (bytes that are not UTF-8) travels
from the task to the driver as data, not as Ray's task error: the driver then raises prepare's own
error (raw_tables.read_raw_table on that table), which `launch.py` turns into exit 2.

Group-bys: `map_key_blocks` co-locates the rows of each key in one block as map_groups does,
then calls its function once per block (vectorised over the block's keys), not once per key;
`sum_by` is a groupby().sum() that way. Writing: `write_table_file` (OrderedParquetSink) writes
a dataset as prepare's one Parquet file per table: part files written by the write tasks, streamed
into the one file in key order, a row group at a time.

Usage:
  with data_context(SMALL_SHUFFLE):
    good, bad, examples = read_validated(raw_dir, "pins", fn)   # fn(table, start) -> pa.Table
    counts = sum_by(ds, ["word"])                               # groupby("word").sum("count")
"""

import contextlib
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from omnisage.data.omnisearchsage.entity_rows import REASONS, RowChecks
from omnisage.data.omnisearchsage.raw_tables import conform_raw_table, read_raw_table

EXAMPLES = 5   # bad rows kept as examples per table (valid_entities' `rejected`)
# A block's reading error, as the `reason` of a summary row (never one of REASONS).
INPUT_ERROR = "input_error: "

# The shuffle prepare runs with. Ray Data's default
# (2.60: SHUFFLE_V2, hash shuffle on aggregator actors) starts its actors for every shuffle, and
# costs 4x the wall time on the demo world (docs/scale_out.md); every group-by here is a
# co-location plus one call per block (map_key_blocks), which a sort does as well.
SMALL_SHUFFLE = "sort_shuffle_pull_based"
# A row group is cut into blocks of at least this many rows when the file has fewer row groups
# than the cluster has CPUs (block_units): below it a task costs more than it saves.
MIN_BLOCK_ROWS = 10_000
# The most a block may hold: rows, and bytes as the Parquet footer counts them (uncompressed).
# Every stage's task works on one block at a time (validation turns rows into Python values),
# so these bound a worker's memory whatever the table's size.
MAX_BLOCK_ROWS = 200_000
MAX_BLOCK_BYTES = 16 * 1024 ** 2
# map_batches over whole blocks, one call per block (its default is a call per 1024 rows): a
# broadcast dict is unpickled by each ray.get, and per-block pre-aggregations need the block.
WHOLE_BLOCKS = dict(batch_size=None, batch_format="pyarrow")


@contextlib.contextmanager
def data_context(shuffle_strategy: str | None = None, progress_bars: bool = False):
  """Ray Data's DataContext of this driver for the datasets made inside; restored after."""
  from ray.data.context import ShuffleStrategy
  ctx = ray.data.DataContext.get_current()
  saved = (ctx.shuffle_strategy, ctx.enable_progress_bars)
  if shuffle_strategy:
    ctx.shuffle_strategy = ShuffleStrategy(shuffle_strategy)
  ctx.enable_progress_bars = progress_bars
  try:
    yield ctx
  finally:
    ctx.shuffle_strategy, ctx.enable_progress_bars = saved


def raw_path(raw_dir: str, name: str) -> str:
  return os.path.join(raw_dir, f"{name}.parquet")


def check_raw_schema(raw_dir: str, name: str) -> int:
  """Step 0 before any value is read: the file exists and its columns conform (an error names
  table, file, column, as prepare's); returns its row count (from the footer)."""
  path = raw_path(raw_dir, name)
  if not os.path.exists(path):
    read_raw_table(raw_dir, name)   # raises prepare's FileNotFoundError
  try:
    meta = pq.read_metadata(path)
  except pa.ArrowException as error:
    raise ValueError(f"{name} table {path}: not a readable Parquet file ({error})") from None
  conform_raw_table(meta.schema.to_arrow_schema().empty_table(), name, f"{name} table {path}")
  return meta.num_rows


def block_units(counts: list[int], cpus: float, min_rows: int = MIN_BLOCK_ROWS,
                sizes: list[int] | None = None, max_rows: int = MAX_BLOCK_ROWS,
                max_bytes: int = MAX_BLOCK_BYTES) -> list[dict]:
  """The blocks of a file with row groups of `counts` rows (`sizes` bytes, uncompressed): {group,
  offset, rows, start (global row)}. A row group is one block, or equal slices of it: when the
  file has fewer row groups than the cluster has CPUs (slices of at least `min_rows` rows, so a
  one-row-group table still keeps every CPU busy, in validation and every stage after it), and
  when it holds more than `max_rows` rows or `max_bytes` bytes (so a block's memory stays the
  same as the table grows). No row group: one empty block."""
  total = sum(counts)
  target = max(min_rows, -(-total // max(int(cpus), 1)))
  units, start = [], 0
  for g, n in enumerate(counts):
    limit = min(target, max_rows)
    if sizes is not None and n:
      limit = min(limit, max(1, max_bytes * n // max(sizes[g], 1)))
    bounds = np.linspace(0, n, max(1, -(-n // limit)) + 1).astype(np.int64)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
      units.append({"group": g, "offset": a, "rows": b - a, "start": start + a})
    start += n
  return units or [{"group": -1, "offset": 0, "rows": 0, "start": 0}]


def read_slice(path: str, group: int, offset: int, rows: int) -> pa.Table:
  """Rows [offset, offset + rows) of row group `group` (-1: the empty table), streamed: a slice
  of a big row group is read in batches with buffered column reads, so the task holds the slice,
  not the row group."""
  file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
  if group < 0:
    return file.schema_arrow.empty_table()
  if offset == 0 and rows == file.metadata.row_group(group).num_rows:
    return file.read_row_group(group)
  parts, seen = [], 0
  for batch in file.iter_batches(batch_size=min(max(rows, 1), 65_536), row_groups=[group]):
    a, b = max(offset - seen, 0), min(offset + rows - seen, len(batch))
    if b > a:
      parts.append(batch.slice(a, b - a))
    seen += len(batch)
    if seen >= offset + rows:
      break
  return pa.Table.from_batches(parts) if parts else file.schema_arrow.empty_table()


def read_row_groups(path: str, name: str, fn, **fn_kwargs) -> ray.data.Dataset:
  """`fn(table, start=first global row, **fn_kwargs) -> pa.Table` over every block of the raw
  table `name` (`block_units`: its row groups, or slices of them), each block its own task
  (read in the task: nothing passes the driver)."""
  meta = pq.read_metadata(path)
  groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
  units = block_units([g.num_rows for g in groups], ray.cluster_resources().get("CPU", 1),
                      sizes=[g.total_byte_size for g in groups], max_rows=MAX_BLOCK_ROWS,
                      max_bytes=MAX_BLOCK_BYTES)
  where = f"{name} table {path}"

  def read(batch: dict) -> pa.Table:
    parts = []
    columns = (batch[k].tolist() for k in ("group", "offset", "rows", "start"))
    for g, offset, rows, s in zip(*columns):
      table = read_slice(path, g, offset, rows)
      try:
        table = conform_raw_table(table, name, where)
      except ValueError as error:   # to the driver as data (module docstring)
        parts.append(pa.table(dict(row=pa.array([s], pa.int64()),
                                   reason=pa.array([INPUT_ERROR + str(error)], pa.string()),
                                   count=pa.array([0], pa.int64()))))
        continue
      parts.append(fn(table, start=s, **fn_kwargs))
    return pa.concat_tables(parts, promote_options="default")

  return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
      read, batch_size=1, batch_format="numpy")


def summary_rows(good: pa.Table, counts: dict, examples: list, start: int) -> pa.Table:
  """`good` (reason null, count 1) + one row per bad-row reason with its count + the example bad
  rows [(block row, reason)] (count 0, their global row number)."""
  good = good.append_column("reason", pa.nulls(good.num_rows, pa.string()))
  good = good.append_column("count", pa.array(np.ones(good.num_rows, np.int64)))
  bad = pa.table(dict(
      row=pa.array([-1] * len(counts) + [start + i for i, _ in examples], pa.int64()),
      reason=pa.array(list(counts) + [r for _, r in examples], pa.string()),
      count=pa.array(list(counts.values()) + [0] * len(examples), pa.int64())))
  return pa.concat_tables([good, bad], promote_options="default")


def with_bad_rows(good: pa.Table, rows: RowChecks, start: int) -> pa.Table:
  """summary_rows from the RowChecks of a block; `good` gets the global `row` of each valid row."""
  good = good.add_column(0, "row", pa.array(start + np.flatnonzero(rows.good).astype(np.int64)))
  examples = [(int(i), REASONS[rows.code[i] - 1]) for i in np.flatnonzero(~rows.good)[:EXAMPLES]]
  return summary_rows(good, rows.counts(), examples, start)


def good_rows(t: pa.Table) -> pa.Table:
  """The valid rows of a block of summary rows."""
  return t.filter(pc.is_null(t["reason"])).drop_columns(["reason", "count"])


def map_key_blocks(ds: ray.data.Dataset, keys: list[str], fn, **fn_kwargs) -> ray.data.Dataset:
  """`fn(block) -> pa.Table` once per block of `ds` rearranged so that every row of a value of
  `keys` lies in one block. It is map_groups' co-location (Ray 2.60 GroupedData.map_groups: a
  hash repartition on `keys` under the hash shuffles, a global sort under the sort shuffle)
  without map_groups' one Python call per key: `fn` sees a block's many keys at once, which is
  what makes a group-by of 50k small keys cost seconds instead of a minute."""
  from ray.data.context import ShuffleStrategy
  ctx = ds.context
  if ctx.shuffle_strategy in (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2,
                              ShuffleStrategy.GPU_SHUFFLE):
    ds = ds.repartition(ctx.default_hash_shuffle_parallelism, keys=keys)
  else:
    ds = ds.sort(keys)
  return ds.map_batches(fn, fn_kwargs=fn_kwargs, **WHOLE_BLOCKS)


def sum_by(ds: ray.data.Dataset, keys: list[str], column: str = "count") -> ray.data.Dataset:
  """groupby(keys).sum(column), the sum keeping the name `column`: pyarrow's group_by in each
  block of map_key_blocks (Ray 2.60's groupby().sum() over 10^5 keys takes ~10 s on 2 cores)."""
  def fn(t: pa.Table) -> pa.Table:
    return t.group_by(keys, use_threads=False).aggregate([(column, "sum")]).rename_columns(
        {f"{column}_sum": column})
  return map_key_blocks(ds, keys, fn)


def driver_table(ds: ray.data.Dataset, empty: pa.Table) -> pa.Table:
  """The rows of `ds` on the driver (for small int columns), or `empty` when it has none: Ray
  Data may drop empty blocks, so a dataset of no rows can have no block and no columns."""
  parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
  return pa.concat_tables(parts) if parts else empty


def ordered(counts: dict) -> dict:
  """Bad-row counts in REASONS order (as RowChecks.counts)."""
  return {r: counts[r] for r in REASONS if counts.get(r)}


def read_validated(raw_dir: str, name: str, fn, **fn_kwargs
                   ) -> tuple[ray.data.Dataset, dict, dict]:
  """read_row_groups + validation `fn` (its output: summary_rows) -> (the valid rows,
  {reason: count summed over blocks} in REASONS order, {row: reason} of the first examples)."""
  ds = read_row_groups(raw_path(raw_dir, name), name, fn, **fn_kwargs).materialize()
  # The summary rows are a few per block: read once, summed on the driver.
  bad = driver_table(ds.map_batches(lambda t: t.filter(pc.is_valid(t["reason"])).select(
      ["row", "reason", "count"]), **WHOLE_BLOCKS), pa.table(dict(
          row=pa.array([], pa.int64()), reason=pa.array([], pa.string()),
          count=pa.array([], pa.int64()))))
  rows, reasons = bad["row"].to_pylist(), bad["reason"].to_pylist()
  failed = sorted((r, why) for r, why in zip(rows, reasons) if why.startswith(INPUT_ERROR))
  if failed:   # prepare's own error (the row number it names counts from the file's start)
    read_raw_table(raw_dir, name)
    raise ValueError(failed[0][1][len(INPUT_ERROR):])
  counts: dict = {}
  for why, n in zip(reasons, bad["count"].to_pylist()):
    counts[why] = counts.get(why, 0) + n
  examples = sorted((r, why) for r, why in zip(rows, reasons) if r >= 0)
  good = ds.map_batches(good_rows, **WHOLE_BLOCKS)
  return good, ordered(counts), dict(examples[:EXAMPLES])


# --- one Parquet file per table, written by a datasink -------------------------------------------
class OrderedParquetSink(ray.data.Datasink):
  """prepare's one-file layout (entities/<kind>.parquet, rows in `key` order). Each write task
  writes its blocks as part files beside `path` and returns their key ranges; the driver then
  streams the parts into `path` in key order, one row group at a time (each part covers one
  range of entity_index, so ordering the parts is enough; overlapping ranges, which the entity
  tables never have, are sorted row by row). No task and no process holds the whole table.
  `path` must be on a filesystem every node sees (as the ArrayRecord shards'). No row at all:
  the table `empty`."""

  def __init__(self, path: str, key: str, empty: pa.Table | None = None):
    self.path, self.key, self.empty = path, key, empty
    self.parts = f"{path}.parts"

  def on_write_start(self, schema=None) -> None:
    shutil.rmtree(self.parts, ignore_errors=True)
    os.makedirs(self.parts)

  def write(self, blocks, ctx) -> list:
    written = []
    for n, block in enumerate(blocks):
      table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
      if not table.num_rows:
        continue
      keys = table[self.key].to_numpy()
      if (np.diff(keys) < 0).any():
        table = table.take(pa.array(np.argsort(keys, kind="stable")))
      part = os.path.join(self.parts, f"{ctx.task_idx}-{n}.parquet")
      pq.write_table(table, part)
      written.append((int(keys.min()), int(keys.max()), part))
    return written

  def on_write_complete(self, write_result) -> None:
    parts = sorted(p for returned in write_result.write_returns for p in returned)
    try:
      if not parts:
        pq.write_table(self.empty, self.path)
      elif any(a[1] > b[0] for a, b in zip(parts, parts[1:])):
        table = pa.concat_tables([pq.read_table(p[2]) for p in parts])
        pq.write_table(table.take(pc.sort_indices(table[self.key])), self.path)
      else:
        schema = pq.read_schema(parts[0][2])
        with pq.ParquetWriter(self.path, schema) as writer:
          for *_, part in parts:
            source = pq.ParquetFile(part)
            for group in range(source.num_row_groups):
              writer.write_table(source.read_row_group(group).cast(schema))
    finally:
      shutil.rmtree(self.parts, ignore_errors=True)


def write_table_file(ds: ray.data.Dataset, path: str, empty: pa.Table | None = None,
                     key: str = "entity_index") -> None:
  """`ds` as the one Parquet file `path` in `key` order (OrderedParquetSink)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.write_datasink(OrderedParquetSink(path, key, empty))
