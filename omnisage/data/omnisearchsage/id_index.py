"""Raw entity id -> entity_index, as Arrow arrays: the lookup the log validation joins on.

Validation turns each log row's raw `entity_id` into its entity's row (entity_index). A Python
dict of every id would be pickled to every validation task and grow with the catalogue in each
worker; here the ids are one Arrow string array in entity_index order, which Ray shares through
its object store without a copy, and a block's lookup is one vectorised `pyarrow.compute.index_in`
(a hash join of the block's ids against the catalogue's).

Usage:
  index = IdIndex(pa.array(["p1", "p7", "p3"]))   # entity_index = position
  index.lookup(table["entity_id"])                 # int64 entity_index, -1 where unknown or null
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class IdIndex:
  """The distinct raw ids of one entity kind; id i has entity_index i."""

  def __init__(self, ids):
    if isinstance(ids, pa.ChunkedArray):
      ids = ids.combine_chunks()
    elif not isinstance(ids, pa.Array):
      ids = pa.array(ids, pa.string())
    self.ids = ids.cast(pa.string())
    if self.ids.null_count:
      raise ValueError("IdIndex: an id is null")

  def __len__(self) -> int:
    return len(self.ids)

  def lookup(self, values) -> np.ndarray:
    """int64 [len(values)]: each value's entity_index, -1 where it is unknown or null."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
      values = pa.array(np.asarray(values, object), pa.string())
    found = pc.index_in(values.cast(pa.string()), value_set=self.ids)
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
