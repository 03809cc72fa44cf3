"""Validation and featurisation of raw pin and product rows (SPEC §1 "Unified pin/product tower").

One implementation for the two places raw entity rows enter: `prepare` (the training tables) and
a serving bundle embedding new entities from their raw rows (`featurize_raw_entities`, see
serving/omnisearchsage/raw_entities.py), so an entity is featurised at serving time exactly as
it was for training: the same text normalisation, the same per-field n-gram encoding and caps,
the same legacy and visual vectors.

A bad row is flagged with the first reason of `REASONS` it has (`RowChecks`), never silently.

Usage:
  rows = RowChecks(table.num_rows); ents = valid_entities(table, "pins", config.data, bad)
  tokens, fields = encode_entities(field_items(ents, boards, engaged), vocab, config.data, "pins")
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from omnisage.data import text
from omnisage.data.omnisearchsage import schema

# Bad-row reasons in precedence order (a row with several defects counts once, under the first).
REASONS = ("missing_field", "undecodable_text", "absurd_length", "empty_text", "invalid_value",
           "negative_timestamp", "timestamp_out_of_range", "nan_vector", "bad_vector",
           "duplicate_id", "unknown_query", "unknown_entity")

VISUAL_BYTES = schema.VISUAL_DIM // 8


class RowChecks:
  """Per-row reason codes of one table (0 = good); the higher-precedence reason wins."""

  def __init__(self, n: int):
    self.code = np.zeros(n, np.int8)

  def flag(self, mask, reason: str) -> None:
    r = REASONS.index(reason) + 1
    self.code[np.asarray(mask) & ((self.code == 0) | (self.code > r))] = r

  @property
  def good(self) -> np.ndarray:
    return self.code == 0

  def counts(self) -> dict:
    c = np.bincount(self.code, minlength=len(REASONS) + 1)[1:]
    return {r: int(n) for r, n in zip(REASONS, c) if n}


def chunk(col) -> pa.Array:
  return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def normalized_texts(col, rows: RowChecks, max_chars: int, required: bool) -> np.ndarray:
  """Normalised texts (object array, None where null) of a string or binary column.

  Flags missing (if `required`), undecodable UTF-8, over-long and (if required) empty-after-
  normalisation rows. Works on distinct values: logs repeat the same query many times.
  """
  enc = chunk(col).dictionary_encode()
  idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
  uniq = enc.dictionary.to_pylist()
  norm = np.empty(len(uniq) + 1, object)  # last slot: null rows (idx -1)
  reason = np.zeros(len(uniq) + 1, np.int8)
  for i, v in enumerate(uniq):
    if isinstance(v, bytes):
      try:
        v = v.decode("utf-8")
      except UnicodeDecodeError:
        reason[i] = 1
        continue
    if len(v) > max_chars:
      reason[i] = 2
      continue
    norm[i] = text.normalize(v)
    reason[i] = 3 if required and not norm[i] else 0
  rows.flag(reason[idx] == 1, "undecodable_text")
  rows.flag(reason[idx] == 2, "absurd_length")
  rows.flag(reason[idx] == 3, "empty_text")
  if required:
    rows.flag(idx < 0, "missing_field")
  return norm[idx]


def check_vectors(col, rows: RowChecks, dim: int) -> None:
  """Flags non-null list<float> rows of the wrong length or with non-finite values."""
  arr = chunk(col)
  present = arr.is_valid().to_numpy(zero_copy_only=False)
  offsets = arr.offsets.to_numpy()
  values = arr.values.to_numpy(zero_copy_only=False).astype(np.float64)
  bad = np.r_[0, np.cumsum(~np.isfinite(values))]  # null floats became NaN: also bad
  rows.flag(present & (np.diff(offsets) != dim), "bad_vector")
  rows.flag(present & (bad[offsets[1:]] - bad[offsets[:-1]] > 0), "nan_vector")


def unpack_bits(values: pa.Array) -> np.ndarray:
  """Binary values of VISUAL_BYTES each -> [n, VISUAL_DIM] uint8 of 0/1."""
  data = b"".join(values.to_pylist())
  return np.unpackbits(np.frombuffer(data, np.uint8).reshape(-1, VISUAL_BYTES), axis=1)


def float_lists(x: np.ndarray, present: np.ndarray) -> pa.Array:
  """[n_present, d] rows scattered into a nullable list<float32> column of len(present) rows."""
  d = x.shape[1] if x.ndim == 2 else 0
  offsets = np.r_[0, np.cumsum(present * d)].astype(np.int32)
  return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.reshape(-1), pa.float32()),
                                  mask=pa.array(~present))


def valid_entities(table: pa.Table, kind: str, d, bad: dict) -> dict:
  """Valid rows of the pins or products table: ids, normalised texts, legacy and visual columns."""
  rows = RowChecks(table.num_rows)
  ids = table["id"].to_numpy(zero_copy_only=False)
  rows.flag(np.fromiter((not i for i in ids), bool, len(ids)), "missing_field")
  texts = {f: normalized_texts(table[f], rows, d.max_text_chars, required=False)
           for f in ("title", "description", "caption") if f in table.column_names}
  legacy_col = "pinsage" if kind == "pins" else "itemsage"
  check_vectors(table[legacy_col], rows, schema.LEGACY_DIM)
  if kind == "pins":
    vis = chunk(table["visual_bits"])
    lengths = pc.binary_length(vis).fill_null(VISUAL_BYTES).to_numpy(zero_copy_only=False)
    rows.flag(lengths != VISUAL_BYTES, "bad_vector")
  else:
    vis = chunk(table["image_bits"])
    img_len = pc.binary_length(vis.values).fill_null(-1).to_numpy(zero_copy_only=False)
    wrong = np.r_[0, np.cumsum(img_len != VISUAL_BYTES)]
    off = vis.offsets.to_numpy()
    rows.flag(wrong[off[1:]] - wrong[off[:-1]] > 0, "bad_vector")
  first = {}
  for i in np.flatnonzero(rows.good):  # duplicate ids: the first valid row wins
    first.setdefault(ids[i], i)
  dup = rows.good.copy()
  dup[list(first.values())] = False
  rows.flag(dup, "duplicate_id")
  bad[kind] = rows.counts()

  keep = np.flatnonzero(rows.good)
  out = dict(ids=ids[keep], **{f: t[keep] for f, t in texts.items()})
  out["rows"] = keep   # input row of each kept entity
  out["rejected"] = {int(i): REASONS[rows.code[i] - 1] for i in np.flatnonzero(~rows.good)[:5]}
  out["legacy"] = chunk(table[legacy_col]).take(pa.array(keep)).cast(pa.list_(pa.float32()))
  vis = vis.take(pa.array(keep))
  present = vis.is_valid().to_numpy(zero_copy_only=False)
  if kind == "pins":
    bits = unpack_bits(vis.drop_null()) if present.any() else np.zeros((0, schema.VISUAL_DIM))
    out["visual"] = float_lists(bits.astype(np.float32), present)
  else:  # a product's visual feature is the mean of its images' bits (SPEC §1)
    n_img = vis.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    present &= n_img > 0
    flat = vis.flatten()
    bits = unpack_bits(flat) if len(flat) else np.zeros((0, schema.VISUAL_DIM), np.uint8)
    starts = np.cumsum(n_img) - n_img
    sums = np.zeros((len(keep), schema.VISUAL_DIM), np.float32)
    # Add the j-th image of every product that has one: total work = number of images, and far
    # faster than a segmented sum along axis 0.
    for j in range(int(n_img.max(initial=0))):
      has = np.flatnonzero(n_img > j)
      sums[has] += bits[starts[has] + j]
    out["visual"] = float_lists(sums[present] / n_img[present, None], present)
  return out


def field_items(ent: dict, boards: dict, engaged: dict) -> list[list[list[str]]]:
  """Per entity, per schema.FIELDS entry, the list of texts encoded one after another."""
  out = []
  for i in range(len(ent["ids"])):
    per_field = []
    for name in schema.FIELDS:
      if name == "board_titles":
        per_field.append(boards.get(i, []))
      elif name.startswith("engaged_queries_"):
        code = schema.ENGAGEMENT_INDEX[name[len("engaged_queries_"):]]
        per_field.append([q for q, _ in engaged.get((i, code), [])])
      else:  # a plain text column (products have no caption)
        value = ent[name][i] if name in ent else None
        per_field.append([value] if value else [])
    out.append(per_field)
  return out


def encode_entities(items, vocab: text.NgramVocab, d, desc: str) -> tuple[pa.Array, pa.Array]:
  """Stacked n-gram tokens and their field ids, capped per field and in total."""
  toks, flds, lengths = [], [], []
  for per_field in tqdm(items, desc=desc, mininterval=2, leave=False):
    n = 0
    for f, texts in enumerate(per_field):
      if not texts or n >= d.max_entity_tokens:
        continue
      ids = vocab.encode(texts[0]) if len(texts) == 1 else np.concatenate(
          [vocab.encode(t) for t in texts])
      ids = ids[:min(d.field_max_tokens, d.max_entity_tokens - n)]
      toks.append(ids)
      flds.append(np.full(len(ids), f, np.int8))
      n += len(ids)
    lengths.append(n)
  offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
  cat = lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t)
  return (pa.ListArray.from_arrays(offsets, pa.array(cat(toks, np.int32), pa.int32())),
          pa.ListArray.from_arrays(offsets, pa.array(cat(flds, np.int8), pa.int8())))


# Optional list<string> columns of a raw row to embed that carry what prepare derives from logs.
LOG_FEATURE_COLUMNS = ("board_titles",) + tuple(f for f in schema.FIELDS
                                                if f.startswith("engaged_queries_"))


def featurize_raw_entities(table: pa.Table, kind: str, vocab: text.NgramVocab, d,
                           where: str) -> tuple[dict, dict]:
  """Raw pin/product rows (schema.RAW_TABLES[kind] columns) -> (entity columns, bad-row counts).

  The entity columns are those of a prepared `entities/<kind>.parquet` (ids, title, tokens,
  fields, legacy, visual) plus `rows` (the input row of each) and `rejected` (up to five bad input
  rows and their reason), made by exactly prepare's code. A required column that is absent is a
  ValueError naming it; a null value in a present column is that entity's missing feature, as in
  training. Board titles and engaged queries come from logs in prepare; here they are the
  optional list<string> columns LOG_FEATURE_COLUMNS (absent: a new entity without that history).
  """
  from omnisage.data.omnisearchsage.raw_tables import conform_raw_table
  if kind not in ("pins", "products"):
    raise ValueError(f"{where}: kind must be 'pins' or 'products', got {kind!r}")
  table = conform_raw_table(table, kind, where)
  bad: dict = {}
  ents = valid_entities(table, kind, d, bad)
  lists = {}
  for name in LOG_FEATURE_COLUMNS:
    if name in table.column_names:
      if name == "board_titles" and kind != "pins":
        raise ValueError(f"{where}: column {name!r} is for pins only")
      values = table[name].to_pylist()
      lists[name] = [[text.normalize(t) for t in (values[r] or []) if t and text.normalize(t)]
                     for r in ents["rows"]]
  boards = dict(enumerate(lists.get("board_titles", [])))
  engaged = {}
  for name, per_entity in lists.items():
    if name.startswith("engaged_queries_"):
      code = schema.ENGAGEMENT_INDEX[name[len("engaged_queries_"):]]
      engaged.update({(i, code): [(q, 0) for q in qs] for i, qs in enumerate(per_entity)})
  tokens, fields = encode_entities(field_items(ents, boards, engaged), vocab, d, f"encode {kind}")
  titles = ents.get("title")
  out = dict(ids=ents["ids"], rows=ents["rows"], rejected=ents["rejected"], tokens=tokens,
             fields=fields, legacy=ents["legacy"], visual=ents["visual"],
             title=[t or "" for t in titles] if titles is not None else [""] * len(ents["ids"]))
  return out, bad[kind]
