"""Steps 0-2 of `launch.py prepare` on Ray Data: raw-table checks, validation, the time split.

Separate from the later stages because everything after reads only what this returns: the
valid rows as Ray datasets, the id -> entity_index lookups (id_index.IdIndex), the bad-row
counts and the split bounds (prepare.py's steps 0 to 2, with the same rules:
entity_rows.valid_entities, log_rows.valid_log, log_rows.valid_saves, and the same errors:
input_checks.InputChecks).

  0. `check_inputs`: every raw table's columns and types from its Parquet footer (no value read),
     then prepare's empty-table errors.
  1. Each row group is validated in its own task (ray_blocks.read_validated); duplicate ids across
     blocks are resolved on the driver over (row, id) of the valid rows (`dedupe_entities`).
     A needed table left with no valid row is prepare's error.
  2. Time split: the last day is a max() aggregation, the split code a map_batches; the train
     rows per entity kind (a group-by count) give prepare's "no training row" error.

Usage:
  checks, raw_rows = check_inputs(config, raw_dir)
  entities = validate_entities(config, raw_dir)            # {kind: EntityStage}
  logs = validate_logs(config, raw_dir, entities)          # LogStage: log, saves, split
"""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_rows import valid_entities
from omnisage.data.omnisearchsage.id_index import IdIndex
from omnisage.data.omnisearchsage.input_checks import InputChecks
from omnisage.data.omnisearchsage.log_rows import DAY, time_range, valid_log, valid_saves
from omnisage.data.omnisearchsage.raw_tables import conform_raw_table
from omnisage.data.omnisearchsage.ray_blocks import (
  EXAMPLES,
  WHOLE_BLOCKS,
  check_raw_schema,
  driver_table,
  good_rows,
  ordered,
  raw_path,
  read_validated,
  summary_rows,
  with_bad_rows,
)

TEXT_FIELDS = ("title", "description", "caption")


def check_inputs(config, raw_dir: str) -> tuple[InputChecks, dict]:
  """Step 0: every raw table's schema (prepare's errors), then its empty-table errors; returns
  the checks and {table: raw rows}."""
  raw_rows = {name: check_raw_schema(raw_dir, name) for name in schema.RAW_TABLES}
  checks = InputChecks(config, raw_dir)
  checks.not_empty(raw_rows)
  return checks, raw_rows


# --- 1. entities ---------------------------------------------------------------------------------
def entity_block(table: pa.Table, start: int, kind: str, d) -> pa.Table:
  """valid_entities of one block: its valid rows (global row, id, texts, legacy, visual) and its
  bad rows. Duplicate ids are flagged within the block here, across blocks by dedupe_entities."""
  bad: dict = {}
  ent = valid_entities(table, kind, d, bad)
  # valid_entities reports counts, not per-row codes; its `rejected` are the examples.
  good = pa.table(dict(
      row=pa.array(start + ent["rows"].astype(np.int64)),
      id=pa.array(ent["ids"], pa.string()),
      **{f: pa.array(ent[f] if f in ent else [None] * len(ent["ids"]), pa.string())
         for f in TEXT_FIELDS},
      legacy=ent["legacy"], visual=ent["visual"]))
  return summary_rows(good, bad[kind], sorted(ent["rejected"].items()), start)


@dataclasses.dataclass
class EntityStage:
  """The valid entities of one kind, in input order: entity_index = position."""
  dataset: ray.data.Dataset      # entity_index, id, title, description, caption, legacy, visual
  index: IdIndex                 # raw id -> entity_index
  bad: dict                      # reason -> count (summed over blocks)
  examples: dict                 # global row -> reason, the first EXAMPLES bad rows
  raw_rows: int
  empty: pa.Table                # no row, the dataset's columns (for a table with no valid row)


def dedupe_entities(good: ray.data.Dataset) -> tuple[np.ndarray, IdIndex, list]:
  """(sorted rows kept, id -> entity_index, rows dropped as duplicate_id): the first valid row of
  an id wins, over all blocks. A group-by (min row per id) of (row, id) on the driver."""
  table = driver_table(good.select_columns(["row", "id"]), pa.table(dict(
      row=pa.array([], pa.int64()), id=pa.array([], pa.string()))))
  first = table.group_by("id", use_threads=False).aggregate([("row", "min")])
  first = first.take(pc.sort_indices(first["row_min"]))
  kept = first["row_min"].to_numpy().astype(np.int64)
  dropped = np.setdiff1d(table["row"].to_numpy(), kept)
  return kept, IdIndex(first["id"]), dropped.tolist()


def validate_entities(config, raw_dir: str, checks: InputChecks | None = None) -> dict:
  """{"pins": EntityStage, "products": EntityStage}: prepare's step 1 for the entity tables
  (and its error for a needed table with no valid row)."""
  checks = checks or InputChecks(config, raw_dir)
  out = {}
  for kind in ("pins", "products"):
    n = check_raw_schema(raw_dir, kind)
    good, bad, examples = read_validated(raw_dir, kind, entity_block, kind=kind, d=config.data)
    kept, index, dups = dedupe_entities(good)
    if dups:
      bad = ordered({**bad, "duplicate_id": bad.get("duplicate_id", 0) + len(dups)})
      examples = dict(sorted({**examples, **dict.fromkeys(dups, "duplicate_id")}.items())
                      [:EXAMPLES])
    checks.valid_entities(kind, len(index), n, bad)

    def number(t: pa.Table, kept=kept) -> pa.Table:
      rows = t["row"].to_numpy()
      pos = np.searchsorted(kept, rows)
      mine = (pos < len(kept)) & (kept[np.minimum(pos, len(kept) - 1)] == rows)
      t = t.filter(pa.array(mine)).drop_columns(["row"])
      return t.add_column(0, "entity_index", pa.array(pos[mine].astype(np.int32)))

    path = raw_path(raw_dir, kind)   # the same functions on no row: the columns, typed
    empty = conform_raw_table(pq.read_schema(path).empty_table(), kind, f"{kind} table {path}")
    out[kind] = EntityStage(good.map_batches(number, **WHOLE_BLOCKS).materialize(),
                            index, bad, examples, n,
                            number(good_rows(entity_block(empty, 0, kind, config.data))))
  return out


# --- 1. logs and board saves ---------------------------------------------------------------------
def log_block(table: pa.Table, start: int, entity_ids: dict, d, valid_times) -> pa.Table:
  """log_rows.valid_log of one block, as summary rows."""
  rows, log = valid_log(table, entity_ids, d, valid_times)
  good = {c: pa.array(log[c], pa.string()) for c in ("query", "target", "kind")}
  good.update({c: pa.array(log[c]) for c in ("entity", "engagement", "timestamp", "split")
               if c in log})
  return with_bad_rows(pa.table(good), rows, start)


def saves_block(table: pa.Table, start: int, pin_ids: IdIndex, d, valid_times) -> pa.Table:
  """log_rows.valid_saves of one block, as summary rows."""
  rows, saves = valid_saves(table, pin_ids, d, valid_times)
  return with_bad_rows(pa.table(dict(pin=pa.array(saves["pin"]),
                                     title=pa.array(saves["title"], pa.string()),
                                     timestamp=pa.array(saves["timestamp"]))), rows, start)


@dataclasses.dataclass
class LogStage:
  """Valid log rows with their split code, valid board saves, and the split's bounds."""
  log: ray.data.Dataset    # row, query, target, kind, entity, engagement, timestamp, split
  saves: ray.data.Dataset  # row, pin, title, timestamp, in_train
  bad: dict                # {"queries_log": {...}, "board_saves": {...}}
  split: dict              # prepare's meta.json "split"
  raw_rows: dict
  train_kinds: set         # entity kinds with a valid training log row


def time_split(log: ray.data.Dataset, d, explicit: bool) -> tuple[ray.data.Dataset, dict, set]:
  """Step 2: split code 0 train / 1 gap / 2 eval (the last eval_days whole UTC days, gap_days
  before them), or the explicit `split` column; returns the log with `split`, the bounds and the
  entity kinds that have training rows."""
  last_day = int(log.max("timestamp")) // DAY
  eval_start = (last_day - d.eval_days + 1) * DAY
  train_end = eval_start - d.gap_days * DAY
  if explicit:
    train_end = eval_start = None
  else:
    def code(t: pa.Table) -> pa.Table:
      ts = t["timestamp"].to_numpy()
      return t.append_column("split", pa.array(
          np.where(ts >= eval_start, 2, np.where(ts < train_end, 0, 1)).astype(np.int64)))
    log = log.map_batches(code, **WHOLE_BLOCKS)
  log = log.materialize()
  counts = {(r["split"], r["kind"]): r["count()"]
            for r in log.groupby(["split", "kind"]).count().take_all()}
  rows = {s: sum(c for (code, _), c in counts.items() if code == s) for s in (0, 1, 2)}
  bounds = dict(kind="column" if explicit else "time", train_end=train_end,
                eval_start=eval_start, eval_end=None if explicit else (last_day + 1) * DAY,
                log_rows=dict(train=int(rows[0]), gap=int(rows[1]), eval=int(rows[2])))
  return log, bounds, {k for (code, k), c in counts.items() if code == 0 and c}


def validate_logs(config, raw_dir: str, entities: dict,
                  checks: InputChecks | None = None) -> LogStage:
  """Steps 1 (logs, board saves) and 2 (the time split), with prepare's errors for a log with no
  valid row and for a configured task with no training row."""
  d = config.data
  checks = checks or InputChecks(config, raw_dir)
  raw_rows = {name: check_raw_schema(raw_dir, name) for name in ("queries_log", "board_saves")}
  explicit = "split" in pq.read_schema(raw_path(raw_dir, "queries_log")).names
  valid_times = time_range(explicit)
  ids = ray.put({k: e.index for k, e in entities.items()})

  def log_fn(table, start):
    return log_block(table, start, ray.get(ids), d, valid_times)

  def saves_fn(table, start):
    return saves_block(table, start, ray.get(ids)["pins"], d, valid_times)

  log, log_bad, _ = read_validated(raw_dir, "queries_log", log_fn)
  log = log.materialize()
  checks.valid_log(log.count(), raw_rows["queries_log"], log_bad)
  saves, saves_bad, _ = read_validated(raw_dir, "board_saves", saves_fn)
  log, split, train_kinds = time_split(log, d, explicit)
  checks.training_rows(train_kinds, log_bad)
  train_end = split["train_end"]

  def in_train(t: pa.Table) -> pa.Table:
    ts = t["timestamp"].to_numpy()
    return t.append_column("in_train", pa.array(
        ts < train_end if train_end is not None else np.ones(len(ts), bool)))

  saves = saves.map_batches(in_train, **WHOLE_BLOCKS).materialize()
  split["board_saves_train"] = int(saves.sum("in_train") or 0) if saves.count() else 0
  return LogStage(log, saves, {"queries_log": log_bad, "board_saves": saves_bad}, split,
                  raw_rows, train_kinds)

