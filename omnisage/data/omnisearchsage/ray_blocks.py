"""Raw Parquet tables as Ray Data blocks with global row numbers, and bad rows counted over blocks.

The Ray Data engine of `launch.py prepare` (ray_prepare.py) validates a raw table one Parquet row
group per block. Ray's read_parquet gives no row numbers, and prepare's rules need them ("the
first valid row of an id wins", the dense entity_index, pairs in log order), so a block here is
read in a task from its row group and knows its first global row (`read_row_groups`).

A validation function turns a block into its valid rows plus one summary row per bad-row reason
(`summary_rows`); `read_validated` splits them again and sums the counts over blocks with a
group-by, so prepare's bad-row table is exact however the table is cut into blocks.

A defect that prepare reports as a ValueError while reading (bytes that are not UTF-8) travels
from the task to the driver as data, not as Ray's task error: the driver then raises prepare's own
error (raw_tables.read_raw_table on that table), which `launch.py` turns into exit 2.

Usage:
  with data_context(SMALL_SHUFFLE):
    good, bad, examples = read_validated(raw_dir, "pins", fn)   # fn(table, start) -> pa.Table
"""

import contextlib
import os

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

# Ray Data's default shuffle (2.60: SHUFFLE_V2, hash shuffle on aggregator actors) is the one
# for big group-bys, but starting its actors costs seconds per group-by, which dominates small
# worlds (docs/scale_out.md, "prepare() vs prepare_on_ray"). Tests pass SMALL_SHUFFLE.
SMALL_SHUFFLE = "sort_shuffle_pull_based"


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


def read_row_groups(path: str, name: str, fn, **fn_kwargs) -> ray.data.Dataset:
  """`fn(table, start=first global row, **fn_kwargs) -> pa.Table` over every row group of the
  raw table `name`, each its own Ray Data block (read in the task: nothing passes the driver).
  A file without row groups is one empty block (so the dataset has the columns of `fn`)."""
  meta = pq.read_metadata(path)
  counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
  starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64) if counts else []
  units = [{"group": g, "start": int(s)} for g, s in enumerate(starts)] or [
      {"group": -1, "start": 0}]
  where = f"{name} table {path}"

  def read(batch: dict) -> pa.Table:
    parts = []
    for g, s in zip(batch["group"].tolist(), batch["start"].tolist()):
      file = pq.ParquetFile(path)
      table = file.read_row_group(g) if g >= 0 else file.schema_arrow.empty_table()
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
  bad = ds.map_batches(lambda t: t.filter(pc.is_valid(t["reason"])).select(
      ["row", "reason", "count"]), batch_format="pyarrow").materialize()
  failed = sorted((r["row"], r["reason"]) for r in bad.map_batches(
      lambda t: t.filter(pc.starts_with(t["reason"], INPUT_ERROR)),
      batch_format="pyarrow").take_all())
  if failed:   # prepare's own error (the row number it names counts from the file's start)
    read_raw_table(raw_dir, name)
    raise ValueError(failed[0][1][len(INPUT_ERROR):])
  good = ds.map_batches(good_rows, batch_format="pyarrow")
  counts = {r["reason"]: int(r["sum(count)"]) for r in bad.groupby("reason").sum("count")
            .take_all() if r["sum(count)"]}
  examples = sorted((r["row"], r["reason"]) for r in bad.map_batches(
      lambda t: t.filter(pc.greater_equal(t["row"], 0)), batch_format="pyarrow").take_all())
  return good, ordered(counts), dict(examples[:EXAMPLES])
