"""Reading one raw table of `launch.py prepare` with its column types checked first.

Every column of schema.RAW_TABLES is checked against its family in schema.RAW_TYPES before any
value is used: a wrong type, or bytes that are not UTF-8 in a string column, is a ValueError that
names the table, the file, the column, the expected and the found type (launch.py: exit 2, no
traceback). Accepted variants (any integer width, timestamps of any unit, large strings and lists,
dictionary encoding) are converted to the one form prepare.py reads.

Usage: `table = read_raw_table(raw_dir, "pins")`.
"""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage import schema


def _is_text(t) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bits(t) -> bool:
  return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_list(t) -> bool:
  return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


# schema.RAW_TYPES family -> whether an Arrow type belongs to it.
_FAMILIES = {
    "text": _is_text,
    "text_or_bytes": lambda t: _is_text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "seconds": lambda t: pa.types.is_integer(t) or pa.types.is_timestamp(t),
    "vector": lambda t: _is_list(t) and pa.types.is_floating(t.value_type),
    "bits": _is_bits,
    "bits_list": lambda t: _is_list(t) and _is_bits(t.value_type),
}


def _check_utf8(col: pa.ChunkedArray, family: str, where: str, name: str) -> None:
  """Raises, naming the first offending row, when a string column holds bytes that are not UTF-8
  (Parquet does not check; pyarrow would fail later, naming neither file nor column)."""
  start = 0
  for chunk in col.chunks:
    raw = chunk.view(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())
    try:
      raw.cast(chunk.type)  # validates UTF-8
    except pa.ArrowInvalid:
      # The first row whose bytes do not survive a decode that replaces invalid sequences.
      row = next(i for i, v in enumerate(raw.to_pylist())
                 if v and v.decode("utf-8", "replace").encode("utf-8") != v)
      hint = (" (write it as binary to have such rows counted as undecodable_text)"
              if family == "text_or_bytes" else "")
      raise ValueError(f"{where}: column {name!r} has Arrow type {col.type} but row {start + row} "
                       f"is not valid UTF-8{hint}") from None
    start += len(chunk)


def _seconds(col: pa.ChunkedArray) -> pa.ChunkedArray:
  """Integer or Arrow timestamp column -> int64 seconds (floored: -0.5 s stays negative)."""
  t = col.type
  if pa.types.is_timestamp(t):
    unit = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
    col = col.cast(pa.int64())
    return pc.divide(pc.if_else(pc.less(col, 0), pc.subtract(col, unit - 1), col), unit)
  if t == pa.uint64():  # beyond int64: clipped (then out of range), not wrapped to negative
    col = pc.min_element_wise(col, pa.scalar(2**63 - 1, pa.uint64()))
  return col.cast(pa.int64())


def _conform(col: pa.ChunkedArray, family: str, where: str, name: str) -> pa.ChunkedArray:
  """`col` checked against its schema.RAW_TYPES family, then cast to the type the steps below read:
  text as it is, seconds int64, vector list<float32|float64>, bits binary, bits_list list<binary>.
  """
  t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
  if not (pa.types.is_null(t) or _FAMILIES[family](t)):
    raise ValueError(f"{where}: column {name!r} has Arrow type {col.type}, expected "
                     f"{schema.RAW_TYPE_FAMILIES[family]} (schema.RAW_TYPES)")
  col = col.cast(t)  # dictionary-encoded: decoded; otherwise a no-op
  if family == "seconds":
    return _seconds(col)
  if family in ("text", "text_or_bytes"):
    if _is_text(t):
      _check_utf8(col, family, where, name)
    return col.cast(pa.string()) if pa.types.is_null(t) else col
  if family == "vector":
    double = not pa.types.is_null(t) and t.value_type == pa.float64()
    want = pa.list_(pa.float64() if double else pa.float32())
  else:
    want = pa.binary() if family == "bits" else pa.list_(pa.binary())
  return col if t == want else col.cast(want)


def read_raw_table(raw_dir: str, name: str) -> pa.Table:
  """Raw table `name`: required columns present (schema.RAW_TABLES), types checked and conformed
  (schema.RAW_TYPES)."""
  path = os.path.join(raw_dir, f"{name}.parquet")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: prepare needs the tables "
                            f"{', '.join(schema.RAW_TABLES)} "
                            "(see omnisage/data/omnisearchsage/schema.py)")
  try:
    table = pq.read_table(path)
  except pa.ArrowException as error:
    raise ValueError(f"{name} table {path}: not a readable Parquet file ({error})") from None
  return conform_raw_table(table, name, f"{name} table {path}")


def conform_raw_table(table: pa.Table, name: str, where: str) -> pa.Table:
  """`table` as raw table `name`: its required columns present (a missing one is a ValueError
  naming it: never read as empty), each typed column checked and cast (schema.RAW_TYPES)."""
  required = {**schema.RAW_TABLES, **schema.OPTIONAL_RAW_TABLES}[name]
  missing = [c for c in required if c not in table.column_names]
  if missing:  # a whole column missing is a loader bug, not a bad row
    raise ValueError(f"{where} lacks columns {missing}")
  for col, family in schema.RAW_TYPES[name].items():
    if col in table.column_names:
      i = table.column_names.index(col)
      table = table.set_column(i, col, _conform(table[col], family, where, col))
  return table
