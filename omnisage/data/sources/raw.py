"""Writes the canonical raw tables that `launch.py prepare` reads (schema.RAW_TABLES), from loaders.

Real datasets have only some of OmniSearchSage's inputs: Home Depot and Best Buy have products and
queries but no pins or boards. Tables not given are written EMPTY with the right column types, so
`prepare` runs unchanged on a products-only world.

Columns are given as Python lists / NumPy arrays; vectors (`itemsage`, `pinsage`) as a float32
[n, 256] array plus an optional boolean `<name>_present` mask (absent rows become null).

Usage:
  write_raw_tables("/tmp/raw", products={"id": ids, "title": titles, "itemsage": vecs},
                   queries_log={"query": q, "entity_kind": k, "entity_id": e,
                                "engagement": g, "timestamp": t, "split": s})
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage import schema

_VECTOR = pa.list_(pa.float32())
TYPES = {
    "queries_log": dict(query=pa.string(), entity_kind=pa.string(), entity_id=pa.string(),
                        engagement=pa.string(), timestamp=pa.int64(), split=pa.string()),
    "pins": dict(id=pa.string(), title=pa.string(), description=pa.string(),
                 caption=pa.string(), pinsage=_VECTOR, visual_bits=pa.binary()),
    "products": dict(id=pa.string(), title=pa.string(), description=pa.string(),
                     itemsage=_VECTOR, image_bits=pa.list_(pa.binary())),
    "board_saves": dict(pin_id=pa.string(), board_title=pa.string(), timestamp=pa.int64()),
    "judged_negatives": dict(query=pa.string(), entity_kind=pa.string(), entity_id=pa.string()),
}


def _vectors(x, present) -> pa.Array:
  x = np.asarray(x, np.float32)
  n, d = x.shape
  mask = None if present is None else pa.array(~np.asarray(present, bool))
  return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d),
                                  pa.array(x.reshape(-1)), mask=mask)


def _table(name: str, columns: dict | None) -> pa.Table:
  types = TYPES[name]
  columns = dict(columns or {})
  unknown = set(columns) - set(types) - {f"{c}_present" for c in types}
  if unknown:
    raise ValueError(f"{name}: unknown columns {sorted(unknown)}; known: {list(types)}")
  lengths = {len(v) for k, v in columns.items()}
  if len(lengths) > 1:
    raise ValueError(f"{name}: columns have different lengths {sorted(lengths)}")
  n = lengths.pop() if lengths else 0
  arrays = {}
  for col, typ in types.items():
    if col == "split" and col not in columns:
      continue  # optional: without it prepare splits by time
    if col not in columns:
      arrays[col] = pa.nulls(n, typ)
    elif typ == _VECTOR:
      arrays[col] = _vectors(columns[col], columns.get(f"{col}_present"))
    else:
      arrays[col] = pa.array(list(columns[col]) if not isinstance(columns[col], np.ndarray)
                             else columns[col], typ)
  return pa.table(arrays)


def write_raw_tables(out_dir: str, **tables) -> dict[str, int]:
  """Writes every table of schema.RAW_TABLES into out_dir (missing ones empty) and the optional
  ones (schema.OPTIONAL_RAW_TABLES) that are given; returns rows."""
  known = [*schema.RAW_TABLES, *schema.OPTIONAL_RAW_TABLES]
  unknown = set(tables) - set(known)
  if unknown:
    raise ValueError(f"unknown raw tables {sorted(unknown)}; known: {known}")
  os.makedirs(out_dir, exist_ok=True)
  rows = {}
  for name in known:
    path = os.path.join(out_dir, f"{name}.parquet")
    if name in schema.OPTIONAL_RAW_TABLES and name not in tables:
      if os.path.exists(path):   # a previous world's table must not leak into this one
        os.remove(path)
      continue
    table = _table(name, tables.get(name))
    pq.write_table(table, path)
    rows[name] = table.num_rows
  return rows
