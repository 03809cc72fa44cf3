"""Validation of the raw engagement tables (queries_log, board_saves, judged_negatives), SPEC §1.

The rules `launch.py prepare` applies on Ray Data (ray_validate.py, ray_pairs.py), one Parquet
row group per block. Each `valid_*` function takes a conformed raw table
(raw_tables.conform_raw_table) and returns its RowChecks (a bad row is dropped AND counted by the
first of entity_rows.REASONS it has) and the columns of its valid rows, in input order. The
entity tables' rules are in entity_rows.py.

Timestamps (seconds since 1970 UTC) are valid in [TIME_MIN, the start of prepare + 1 day]: below
zero is `negative_timestamp`, otherwise outside is `timestamp_out_of_range`. A log with an
explicit `split` column is not split by time (Home Depot has no time and writes 0), so there, and
for its board saves, the lower bound is 0 (`time_range`).

Usage:
  rows, log = valid_log(table, {"pins": pin_index, "products": product_index}, config.data,
                        time_range("split" in table.column_names))   # id_index.IdIndex each
  bad["queries_log"] = rows.counts()
"""

import os
import time

import numpy as np
import pyarrow as pa

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_rows import RowChecks, normalized_texts

DAY = 86_400
TIME_MIN = 946_684_800  # 2000-01-01 00:00 UTC
ALLOWED = {"pins": ("save", "long_click"), "products": ("save", "long_click", "add_to_cart",
           "checkout"), "queries": ("click",)}
# Values of the optional queries_log column `split` -> split code (0 train, 2 eval; 1 is the time
# gap, which an explicit split does not have).
SPLITS = {"train": 0, "eval": 2}
# Entity kind of a judged negative -> the task whose hard-negative table it joins.
JUDGED_TASKS = {"pins": "q2pin", "products": "q2product"}


def time_range(explicit_split: bool) -> tuple[int, int]:
  """[lowest, highest] valid timestamp; an explicit split accepts 0 (datasets without time)."""
  return (0 if explicit_split else TIME_MIN, int(time.time()) + DAY)


def entity_indices(kind: np.ndarray, ids: pa.ChunkedArray, entity_ids: dict,
                   rows: RowChecks) -> np.ndarray:
  """int64 [rows]: each row's entity_index (-1 for a kind not in `entity_ids`, or an unknown
  id); a valid row whose id its kind's IdIndex does not know is flagged unknown_entity. Each
  kind looks up its own rows only."""
  out, unknown = np.full(len(kind), -1, np.int64), np.zeros(len(kind), bool)
  for k, index in entity_ids.items():
    sel = np.flatnonzero(kind == k)
    out[sel] = index.lookup(ids.take(pa.array(sel)))
    unknown[sel] = out[sel] < 0
  rows.flag(rows.good & unknown, "unknown_entity")
  return out


def timestamps(col, rows: RowChecks, lo: int, hi: int) -> np.ndarray:
  """int64 seconds (0 where null) of a conformed column; flags null, negative, out-of-range rows."""
  null = col.is_null().to_numpy(zero_copy_only=False)
  ts = col.fill_null(0).to_numpy().astype(np.int64)
  rows.flag(null, "missing_field")
  rows.flag(~null & (ts < 0), "negative_timestamp")
  rows.flag(~null & ((ts < lo) | (ts > hi)), "timestamp_out_of_range")
  return ts


def valid_log(table: pa.Table, entity_ids: dict, d, valid_times) -> tuple[RowChecks, dict]:
  """Valid log rows: normalised query and target, kind, entity_index (-1 for a query target),
  engagement code, timestamp, and `split` code when the table has an explicit split column.
  `entity_ids`: {"pins": IdIndex, "products": IdIndex}."""
  rows = RowChecks(table.num_rows)
  query = normalized_texts(table["query"], rows, d.max_text_chars, required=True)
  target = normalized_texts(table["entity_id"], rows, d.max_text_chars, required=True)
  kind = table["entity_kind"].to_numpy(zero_copy_only=False)
  eng = table["engagement"].to_numpy(zero_copy_only=False)
  ts = timestamps(table["timestamp"], rows, *valid_times)
  rows.flag((kind == None) | (eng == None), "missing_field")  # noqa: E711
  allowed = {(k, e) for k, es in ALLOWED.items() for e in es}
  rows.flag(np.fromiter(((k, e) not in allowed for k, e in zip(kind, eng)), bool, len(kind)),
            "invalid_value")
  has_split = "split" in table.column_names
  if has_split:  # an explicit split (datasets without time) overrides the time split
    split = table["split"].to_numpy(zero_copy_only=False)
    rows.flag(np.fromiter((s not in SPLITS for s in split), bool, len(split)), "invalid_value")
  eidx = entity_indices(kind, table["entity_id"], entity_ids, rows)
  keep = rows.good
  out = dict(query=query[keep], target=target[keep], kind=kind[keep], entity=eidx[keep],
             engagement=np.array([schema.ENGAGEMENT_INDEX[e] for e in eng[keep]], np.int64),
             timestamp=ts[keep])
  if has_split:
    out["split"] = np.array([SPLITS[s] for s in split[keep]], np.int64)
  return rows, out


def valid_saves(table: pa.Table, pin_ids, d, valid_times) -> tuple[RowChecks, dict]:
  """Valid board saves: pin entity_index, normalised board title, timestamp. `pin_ids`: the
  pins' IdIndex."""
  rows = RowChecks(table.num_rows)
  title = normalized_texts(table["board_title"], rows, d.max_text_chars, required=True)
  ts = timestamps(table["timestamp"], rows, *valid_times)
  rows.flag(table["pin_id"].is_null().to_numpy(zero_copy_only=False), "missing_field")
  pins = pin_ids.lookup(table["pin_id"])
  rows.flag(pins < 0, "unknown_entity")
  keep = rows.good
  return rows, dict(pin=pins[keep], title=title[keep], timestamp=ts[keep])


def valid_judged(table: pa.Table, d, entity_ids: dict, q_index: dict, train_queries: set
                 ) -> tuple[RowChecks, dict]:
  """Valid judged negatives: task, query_index, entity_index.

  A row is kept when its (normalised) query is a TRAINING query of the log (`train_queries`:
  query indices) and its entity exists; otherwise it is a bad row (unknown_query: the query has
  no training pair, so the negative could never be used; unknown_entity)."""
  rows = RowChecks(table.num_rows)
  query = normalized_texts(table["query"], rows, d.max_text_chars, required=True)
  kind = table["entity_kind"].to_numpy(zero_copy_only=False)
  ids = table["entity_id"].to_numpy(zero_copy_only=False)
  rows.flag((kind == None) | (ids == None), "missing_field")  # noqa: E711
  rows.flag(np.fromiter((k not in JUDGED_TASKS for k in kind), bool, len(kind)), "invalid_value")
  known_query = np.fromiter((q_index.get(q, -1) in train_queries for q in query), bool, len(query))
  rows.flag(rows.good & ~known_query, "unknown_query")
  eidx = entity_indices(kind, table["entity_id"], {k: entity_ids[k] for k in JUDGED_TASKS},
                        rows)
  keep = rows.good
  return rows, dict(
      task=np.array([JUDGED_TASKS[k] for k in kind[keep]], object),
      query_index=np.array([q_index[q] for q in query[keep]], np.int64),
      entity_index=eidx[keep])


def remove_stale_judged(out_dir: str) -> str:
  """Removes the judged tables of an earlier prepare of `out_dir`; returns their directory."""
  from omnisage.data.omnisearchsage.hard_negatives import table_dir
  directory = table_dir(out_dir)
  for task in JUDGED_TASKS.values():
    if os.path.exists(os.path.join(directory, f"{task}.judged.parquet")):
      os.remove(os.path.join(directory, f"{task}.judged.parquet"))
  return directory


def write_judged(directory: str, judged: dict) -> dict:
  """valid_judged's rows (in input order) -> <directory>/<task>.judged.parquet per task that has
  one (hard_negatives.write_table); returns {task: rows written}."""
  from omnisage.data.omnisearchsage.hard_negatives import write_table
  written = {}
  for task in JUDGED_TASKS.values():
    sel = judged["task"] == task
    if sel.any():
      written[task] = write_table(os.path.join(directory, f"{task}.judged.parquet"),
                                  judged["query_index"][sel].tolist(),
                                  judged["entity_index"][sel].tolist(), "judged")
  return written


def int32_lists(rows) -> pa.Array:
  offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32)
  values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
  return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def queries_table(entity_index: np.ndarray, texts: list, tokens: list, lexical: list) -> pa.Table:
  """Rows of entities/queries.parquet. tokens: the query tower's WordPiece ids; lexical: the same
  n-gram ids an entity title gets (the query tower's lexical path, models/lexical_path.py)."""
  return pa.table(dict(entity_index=pa.array(np.asarray(entity_index, np.int32)),
                       text=pa.array(texts, pa.string()), tokens=int32_lists(tokens),
                       lexical=int32_lists(lexical)))
