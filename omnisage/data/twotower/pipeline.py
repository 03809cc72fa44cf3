"""Grain input pipeline of the home-feed two-tower model (SPEC §3).

A MapDataset over example indices of the prepared Parquet shards -> this host's slice -> shuffle
(reseeded every epoch) -> repeat -> batch(global batch / hosts) -> one vectorised map that gathers
the example columns and the catalogue's item features. Its iterator state is an element index,
saved in every checkpoint, so a resumed run reads the same batches.

Usage: `iterator = train_iterator(config, load_examples(prepared), Catalogue.load(prepared))`.
"""

import grain
import jax
import numpy as np

from omnisage.data.twotower import examples as mlx


class GatherBatch(grain.transforms.Map):
  """A batch of example indices -> the towers' inputs (history genres and item features come
  from the catalogue, so they are stored once per item, not once per example)."""

  def __init__(self, examples: dict, catalogue: mlx.Catalogue):
    self.examples, self.catalogue = examples, catalogue

  def map(self, rows: np.ndarray) -> dict:
    ex = {k: v[rows] for k, v in self.examples.items()}
    return {"user": ex["user"],
            **self.catalogue.user_inputs(ex["hist_items"], ex["hist_age"], ex["user_dense"]),
            **self.catalogue.item_inputs(ex["item"]),
            "item_dense": ex["item_dense"]}   # popularity as of the example's time


def train_dataset(config, examples: dict, catalogue) -> grain.MapDataset:
  n, hosts = len(examples["item"]), jax.process_count()
  batch = int(config.train.batch_size)
  if batch % hosts:
    raise ValueError(f"train.batch_size={batch} is not divisible by {hosts} hosts")
  ds = grain.MapDataset.range(n)[jax.process_index()::hosts]
  return (ds.seed(config.seed).shuffle().repeat()
          .batch(batch // hosts, drop_remainder=True).map(GatherBatch(examples, catalogue)))


def train_iterator(config, examples, catalogue) -> grain.DatasetIterator:
  ds = train_dataset(config, examples, catalogue)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
