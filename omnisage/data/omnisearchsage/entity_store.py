"""In-memory entity feature store: the prepared Parquet entity tables as padded NumPy arrays.

Pairs carry only entity indices; the evaluators and mining, which embed whole corpora, gather an
entity's features from here, as production reads pin/product features from a feature store (SPEC
§1 "Serving": features and embeddings live in a feature store keyed by entity). Training does not:
its examples carry their features (feature_examples.py).

Usage: `store = EntityStore.load(prepared_dir, "pins", max_tokens=384); store.gather(idx)`.
"""

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage import schema

CONTINUOUS_DIM = 2 * schema.LEGACY_DIM + schema.VISUAL_DIM  # [pinsage | itemsage | visual]


def pad_list_column(column, max_len: int, dtype) -> np.ndarray:
  """A pyarrow list column -> [rows, max_len] array, right-padded with 0 and truncated."""
  column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
  offsets = column.offsets.to_numpy()
  values = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
  rows = len(column)
  lengths = np.minimum(np.diff(offsets), max_len)
  out = np.zeros((rows, max_len), dtype)
  # Vectorised scatter: position of each kept value inside its row.
  row_of = np.repeat(np.arange(rows), lengths)
  starts = np.repeat(offsets[:-1], lengths)
  pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  out[row_of, pos] = values[starts + pos]
  return out


def fixed_vectors(column, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Nullable list<float> column -> ([rows, dim] float32 zero-filled, [rows] bool present)."""
  column = column.combine_chunks()
  present = column.is_valid().to_numpy(zero_copy_only=False)
  out = np.zeros((len(column), dim), np.float32)
  if present.any():
    kept = column.filter(column.is_valid())
    flat = kept.values.to_numpy(zero_copy_only=False).astype(np.float32)
    out[present] = flat.reshape(-1, dim)
  return out, present


def continuous_vectors(kind: str, legacy: np.ndarray, visual: np.ndarray) -> np.ndarray:
  """[rows, 1536] [pinsage | itemsage | visual] from a kind's legacy and visual rows (zeros where
  missing). Shared with batch serving so served embeddings see exactly the training layout."""
  out = np.zeros((len(legacy), CONTINUOUS_DIM), np.float32)
  slot = 0 if kind == "pins" else schema.LEGACY_DIM   # pins have no ItemSage and v.v.
  out[:, slot:slot + schema.LEGACY_DIM] = legacy
  out[:, 2 * schema.LEGACY_DIM:] = visual
  return out


@dataclasses.dataclass
class EntityStore:
  """Padded features of one entity kind; row i is entity_index i."""
  kind: str
  tokens: np.ndarray                  # [N, L] int32 stacked n-gram ids (queries: the query
                                      # tower's input rows, query_input.py)
  fields: np.ndarray | None = None    # [N, L] int8 field of each token (pins/products)
  legacy: np.ndarray | None = None    # [N, 256] float32 PinSage/ItemSage, zeros where missing
  has_legacy: np.ndarray | None = None  # [N] bool
  visual: np.ndarray | None = None    # [N, 1024] float16 in [0, 1], zeros where missing
  titles: np.ndarray | None = None    # [N] object, for reading results
  truncated: int = 0                  # rows with more tokens than the padded width (cut, counted)

  @property
  def size(self) -> int:
    return self.tokens.shape[0]

  @classmethod
  def load(cls, prepared_dir: str, kind: str, max_tokens: int,
           lexical_len: int = 0) -> "EntityStore":
    """lexical_len > 0 (queries only): each query row is its WordPiece ids padded to max_tokens,
    then its n-gram ids padded to lexical_len (query_input.py), the lexical query tower's input."""
    path = os.path.join(prepared_dir, "entities", f"{kind}.parquet")
    table = pq.read_table(path)
    index = table.column("entity_index").to_numpy()
    if not np.array_equal(index, np.arange(len(index))):
      raise ValueError(f"{path}: entity_index must be 0..N-1 in row order")
    tokens = pad_list_column(table.column("tokens"), max_tokens, np.int32)
    lengths = np.diff(table.column("tokens").combine_chunks().offsets.to_numpy())
    truncated = int(np.sum(lengths > max_tokens))
    if kind == "queries":
      if lexical_len:
        if "lexical" not in table.column_names:
          raise ValueError(f"{path} has no 'lexical' column (model.query.lexical needs it): "
                           "rerun `launch.py prepare`")
        lexical = table.column("lexical")
        tokens = np.concatenate([tokens, pad_list_column(lexical, lexical_len, np.int32)], 1)
        lex_lengths = np.diff(lexical.combine_chunks().offsets.to_numpy())
        truncated += int(np.sum(lex_lengths > lexical_len))
      return cls(kind, tokens, titles=np.asarray(table.column("text").to_pylist(), object),
                 truncated=truncated)
    fields = pad_list_column(table.column("fields"), max_tokens, np.int8)
    legacy, has_legacy = fixed_vectors(table.column("legacy"), schema.LEGACY_DIM)
    visual, _ = fixed_vectors(table.column("visual"), schema.VISUAL_DIM)
    return cls(kind, tokens, fields, legacy, has_legacy, visual.astype(np.float16),
               np.asarray(table.column("title").to_pylist(), object), truncated)

  def continuous(self, idx: np.ndarray) -> np.ndarray:
    """[pinsage | itemsage | visual] with zeros for what an entity lacks (SPEC §1)."""
    return continuous_vectors(self.kind, self.legacy[idx], self.visual[idx])

  def gather(self, idx: np.ndarray, prefix: str) -> dict:
    """Model inputs of entities `idx`, keyed `<prefix>_tokens`, ... ."""
    if self.kind == "queries":
      return {f"{prefix}_tokens": self.tokens[idx]}
    return {f"{prefix}_tokens": self.tokens[idx],
            f"{prefix}_fields": self.fields[idx].astype(np.int32),
            f"{prefix}_continuous": self.continuous(idx),
            f"{prefix}_legacy": self.legacy[idx],
            f"{prefix}_has_legacy": self.has_legacy[idx]}
