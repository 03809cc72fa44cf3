"""Readers of a prepared directory for the code that still needs the entity catalogue.

Training no longer reads through here: its input is the examples that carry their features
(feature_examples.py, streamed by feature_pipeline.FeatureTrainData), so no host holds the
catalogue to train. The evaluators (omnisage/train/evaluators/), hard-negative mining and the
trained towers still embed whole corpora and look pairs up by entity row, so this module keeps:

  load_stores      the padded entity tables in memory (entity_store.EntityStore), per kind
  read_pairs       a split's pairs of one task as arrays (all, or a seeded sample)
  packed_queries   the query rows the lexical query tower reads instead of a pair's WordPiece ids
  shard_paths, task_batch_sizes   the pair shards of a split and task; the per-task batch mix

Usage:
  stores = load_stores(prepared_dir, config.data, lexical_len(config))
  pairs = read_pairs(prepared_dir, "eval", "q2pin", 1000, seed, config.data.batch_query_len)
"""

import glob
import os

import grain
import numpy as np

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_store import EntityStore


def shard_paths(prepared_dir: str, split: str, task: str) -> list[str]:
  paths = sorted(glob.glob(os.path.join(prepared_dir, split, task, "*.array_record")))
  if not paths:
    raise FileNotFoundError(
        f"no {split} shards for task {task} under {prepared_dir}/{split}/{task}")
  return paths


def load_stores(prepared_dir: str, data_config, lexical_len: int = 0) -> dict[str, EntityStore]:
  """Entity stores keyed by entity kind (pins, products, queries); lexical_len: the query rows'
  n-gram width (query_input.lexical_len of the config; 0 without the lexical path)."""
  return {
      "pins": EntityStore.load(prepared_dir, "pins", data_config.max_entity_tokens),
      "products": EntityStore.load(prepared_dir, "products", data_config.max_entity_tokens),
      "queries": EntityStore.load(prepared_dir, "queries", data_config.batch_query_len,
                                  lexical_len),
  }


def packed_queries(stores: dict, data_config) -> np.ndarray | None:
  """The query store's rows when they are packed with n-gram ids (read_pairs' `queries`)."""
  rows = stores["queries"].tokens
  return rows if rows.shape[1] != data_config.batch_query_len else None


def task_batch_sizes(config) -> dict[str, int]:
  return {task: int(config.tasks[task]) for task in schema.TASK_ENTITY if config.tasks[task] > 0}


def _decode(record: bytes, max_len: int, queries: np.ndarray | None) -> dict:
  """Pair record -> query tokens (padded with 0 to max_len, or its packed query row), ids."""
  pair = schema.decode_pair(record)
  if queries is not None:
    tokens = queries[pair["query_index"]]
  else:
    tokens = np.zeros(max_len, np.int32)
    n = min(len(pair["query_tokens"]), max_len)
    tokens[:n] = pair["query_tokens"][:n]
  return {"query_tokens": tokens, "query_ids": np.int32(pair["query_index"]),
          "pos_ids": np.int32(pair["entity_index"])}


def read_pairs(prepared_dir: str, split: str, task: str, max_pairs: int, seed: int,
               max_len: int, queries: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """All (or a seeded random `max_pairs` subset of) a split's pairs of one task, as arrays.

  queries: the query store's rows ([num_queries, W], EntityStore.tokens) when they differ from
  the record's WordPiece ids (the lexical query tower's packed rows, `packed_queries`): a pair's
  query tokens are then its query's row.
  """
  source = grain.sources.ArrayRecordDataSource(shard_paths(prepared_dir, split, task))
  n = len(source)
  order = np.random.default_rng(seed).permutation(n)[:max_pairs] if max_pairs < n else np.arange(n)
  rows = [_decode(source[int(i)], max_len, queries) for i in np.sort(order)]
  if not rows:
    raise ValueError(f"{split}/{task} has no pairs under {prepared_dir}")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
