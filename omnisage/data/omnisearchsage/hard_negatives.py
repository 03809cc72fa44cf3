"""Hard negatives per query: the table the input pipeline joins, and how a batch samples from it.

A hard negative of a training query is an entity that looks relevant but is not: a judged
irrelevant result (Home Depot pairs with relevance < 2) or one mined from a retriever's top results
outside the query's positives (ANCE, Xiong et al. 2021: refreshed from the current model). They
join the row's in-batch softmax without a logQ correction (omnisage/train/losses.py).

On disk, one Parquet file per task under <prepared>/hard_negatives/ (or `data.hard_negatives_dir`):

  <task>.parquet, <task>.<name>.parquet (e.g. q2product.judged.parquet, q2product.mined.parquet)
                   query_index int64 (the query's row in entities/queries.parquet),
                   entity_index int64 (the negative's row in the task's entity table),
                   source string ("judged", "model", "bm25", ...)

All files of a task are joined (judged + mined); duplicates are dropped on load.

Usage:
  write_table(path, query_index, entity_index, source="judged")
  table = HardNegatives.load(prepared_dir, "q2product")          # None when there is no file
  ids, valid = table.sample(query_ids, pos_ids, k=2, rng=rng)    # [B, k] each
"""

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("query_index", "entity_index", "source")


def table_dir(prepared_dir: str, override: str = "") -> str:
  return override or os.path.join(prepared_dir, "hard_negatives")


def write_table(path: str, query_index, entity_index, source) -> int:
  """Writes (or replaces, atomically) one task's table; returns its row count."""
  query_index = np.asarray(query_index, np.int64)
  entity_index = np.asarray(entity_index, np.int64)
  if query_index.shape != entity_index.shape or query_index.ndim != 1:
    raise ValueError(f"{path}: query_index and entity_index must be 1-d and of one length")
  sources = [source] * len(query_index) if isinstance(source, str) else list(source)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  pq.write_table(pa.table({"query_index": query_index, "entity_index": entity_index,
                           "source": pa.array(sources, pa.string())}), tmp)
  os.replace(tmp, path)
  return len(query_index)


def _read(path: str, num_queries: int, num_entities: int) -> tuple[np.ndarray, np.ndarray]:
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowException) as error:
    raise ValueError(f"{path}: not a readable parquet file ({error})") from error
  missing = [c for c in COLUMNS[:2] if c not in table.column_names]
  if missing:
    raise ValueError(f"{path}: no column(s) {missing} (have {table.column_names})")
  q = table.column("query_index").to_numpy().astype(np.int64)
  e = table.column("entity_index").to_numpy().astype(np.int64)
  for name, values, bound in (("query_index", q, num_queries), ("entity_index", e, num_entities)):
    bad = (values < 0) | (values >= bound)
    if bad.any():
      raise ValueError(f"{path}: column {name}: {int(bad.sum())} values outside [0, {bound}) "
                       f"(first: {int(values[bad][0])}); was it mined for another prepare?")
  return q, e


class HardNegatives:
  """Per query, the sorted distinct entity rows of its hard negatives (CSR layout)."""

  def __init__(self, query_index: np.ndarray, entity_index: np.ndarray, num_queries: int):
    pairs = np.unique(np.stack([query_index, entity_index], axis=1), axis=0)
    self.entities = pairs[:, 1].astype(np.int32)
    counts = np.bincount(pairs[:, 0], minlength=num_queries)
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  @classmethod
  def load(cls, prepared_dir: str, task: str, num_queries: int, num_entities: int,
           override: str = "") -> "HardNegatives | None":
    directory = table_dir(prepared_dir, override)
    paths = sorted(glob.glob(os.path.join(directory, f"{task}.parquet")) +
                   glob.glob(os.path.join(directory, f"{task}.*.parquet")))
    if not paths:
      return None
    qs, es = [], []
    for path in paths:
      q, e = _read(path, num_queries, num_entities)
      qs.append(q)
      es.append(e)
    return cls(np.concatenate(qs), np.concatenate(es), num_queries)

  def count(self, query: int) -> int:
    return int(self.offsets[query + 1] - self.offsets[query])

  def sample(self, query_ids: np.ndarray, pos_ids: np.ndarray, k: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to k hard negatives per row, drawn without replacement from its query's list minus
    the row's own positive: ([B, k] int32 entity rows, 0 in padding; [B, k] bool valid)."""
    ids = np.zeros((len(query_ids), k), np.int32)
    valid = np.zeros((len(query_ids), k), bool)
    for row, (query, pos) in enumerate(zip(query_ids, pos_ids)):
      start, end = self.offsets[query], self.offsets[query + 1]
      pool = self.entities[start:end]
      pool = pool[pool != pos]
      if len(pool) == 0:
        continue
      take = pool if len(pool) <= k else rng.choice(pool, size=k, replace=False)
      ids[row, :len(take)] = take
      valid[row, :len(take)] = True
    return ids, valid
