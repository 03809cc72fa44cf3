"""Grain input pipeline of PinText (SPEC §2).

Per task, Parquet pairs -> this host's slice -> shuffle (reseeded every epoch) -> repeat -> batch;
the task streams are zipped and one RandomMap adds each pair's positive item words and rho uniform
random catalogue items. Every random choice derives from (seed, element index), which the Grain
iterator state (saved inside each checkpoint) restores: a resumed run is bit-identical to an
uninterrupted one.

Usage: `iterator = train_iterator(config, prepared, load_catalogues(config, prepared))`.
"""

import grain
import jax
import numpy as np
from grain.experimental import ZipMapDataset

from omnisage.data.pintext import pairs as pintext_pairs

STEPS_LIMIT = 1 << 40   # batches per task stream; far beyond any run


# --- data ------------------------------------------------------------------------------------
class _Rows:
  """A random-access Grain source over row-aligned NumPy arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


class AddItemsAndNegatives(grain.transforms.RandomMap):
  """Positive item words from the catalogue, and rho uniform random catalogue items per pair."""

  def __init__(self, tasks, catalogues: dict[str, np.ndarray], negatives: int):
    self.tasks, self.catalogues, self.rho = tasks, catalogues, negatives

  def random_map(self, per_task: tuple, rng: np.random.Generator) -> dict:
    out = {}
    for task, pairs in zip(self.tasks, per_task):
      catalogue = self.catalogues[task]
      rows = pairs["item_row"]
      neg = rng.integers(0, len(catalogue), (len(rows), self.rho))
      out[task] = {"query": pairs["query"], "pos": catalogue[rows], "neg": catalogue[neg],
                   "neg_mask": neg != rows[:, None]}   # False: the negative IS the positive
    return out


def load_catalogues(config, prepared: str) -> dict[str, np.ndarray]:
  return {t: pintext_pairs.read_catalogue(prepared, t, config.data.item_len)
          for t in config.tasks}


def train_iterator(config, prepared: str, catalogues) -> grain.DatasetIterator:
  count, index = jax.process_count(), jax.process_index()
  if config.train.batch_per_task % count:
    raise ValueError(f"train.batch_per_task={config.train.batch_per_task} is not divisible by "
                     f"{count} hosts")
  streams = []
  for i, task in enumerate(config.tasks):
    pairs = pintext_pairs.read_pairs(prepared, "train", task, config.data.query_len)
    if len(pairs["item_row"]) < config.train.batch_per_task:
      raise ValueError(f"task {task}: {len(pairs['item_row'])} train pairs, fewer than "
                       f"train.batch_per_task={config.train.batch_per_task}")
    ds = grain.MapDataset.source(_Rows(pairs))[index::count]   # each host its own slice
    ds = (ds.seed(config.seed + 1000 * i).shuffle().repeat()
          .batch(config.train.batch_per_task // count, drop_remainder=True))
    streams.append(ds[:STEPS_LIMIT])   # equal (endless) lengths for the zip
  features = AddItemsAndNegatives(list(config.tasks), catalogues, config.loss.negatives)
  ds = ZipMapDataset(parents=streams).random_map(features, seed=config.seed + 7919 * (index + 1))
  return iter(ds.to_iter_dataset())
