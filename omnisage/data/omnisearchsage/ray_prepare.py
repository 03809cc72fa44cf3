"""`launch.py prepare` on Ray Data: prepare.py's prepared directory from streaming Ray Data stages.

Not yet the `prepare` of launch.py: its output is held to prepare.py's (tests/test_prepare_ray.py:
the frozen digest of the tiny synthetic world, tests/fixtures/prepare_tiny_digest.json, and the
same directory as prepare() on a Home Depot-style world with judged negatives), its errors are
prepare's (input_checks.py), and its summary has prepare's keys plus `engine: "ray"`
(docs/scale_out.md, "prepare on Ray Data: status").

The stages, by the numbers of prepare.py's docstring, one module each:
  ray_blocks.py    raw row groups as blocks with global row numbers; bad rows summed over blocks
  ray_validate.py  0-2: schema and empty-table checks, validation, duplicate ids, time split
  ray_features.py  3-5: board titles, engaged queries, n-gram vocabularies, entity tables
  ray_pairs.py     5: queries table (WordPiece), judged negatives, pair caps and ArrayRecord shards
The rules themselves (which row is valid, the errors, the queries table's columns) are shared
with prepare.py: entity_rows.py, log_rows.py, input_checks.py.

`seconds` has prepare's keys (validate, query_vocab, features, entities, pairs). Ray's order is
prepare's except that the queries' WordPiece tokens are computed with their lexical ids in
`entities` (prepare counts them in `query_vocab`).

Usage (Ray joined first, e.g. omnisage/data/ray_runtime.init_ray):
  with ray_blocks.data_context(ray_blocks.SMALL_SHUFFLE):   # small worlds: see SMALL_SHUFFLE
    summary = prepare_on_ray(get_config(), "/tmp/raw", "/tmp/prepared")
"""

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from omnisage.data.omnisearchsage.ray_features import (
  board_titles,
  encode_block,
  encode_entity_tables,
  engaged_queries,
  ngram_vocab,
)
from omnisage.data.omnisearchsage.ray_pairs import (
  judged_negatives,
  query_table,
  query_texts,
  query_vocab,
  write_pairs,
)
from omnisage.data.omnisearchsage.ray_validate import check_inputs, validate_entities, validate_logs


def write_table_file(ds: ray.data.Dataset, path: str, empty: pa.Table | None = None) -> int:
  """One Parquet file of `ds` in entity_index order, streamed batch by batch through the driver
  (prepare's single-file layout; a datasink per file is the next step). A dataset with no row is
  the table `empty` (its columns: Ray Data may drop empty blocks), as prepare writes it. Returns
  its rows."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  writer, n = None, 0
  for batch in ds.sort("entity_index").iter_batches(batch_format="pyarrow", batch_size=None):
    if writer is None:
      writer = pq.ParquetWriter(path, batch.schema)
    writer.write_table(batch)
    n += batch.num_rows
  if writer is None:
    pq.write_table(empty, path)
  else:
    writer.close()
  return n


def prepare_on_ray(config, raw_dir: str, out_dir: str, query_workers: int = 1) -> dict:
  """prepare.prepare's directory and summary (also meta.json), computed on the Ray cluster this
  process has joined. `query_workers`: QueryTokens actors (TensorFlow in each)."""
  d, clock, seconds = config.data, time.perf_counter(), {}

  def lap(stage: str) -> None:
    seconds[stage] = time.perf_counter() - clock - sum(seconds.values())

  checks, raw_rows = check_inputs(config, raw_dir)
  entities = validate_entities(config, raw_dir, checks)
  logs = validate_logs(config, raw_dir, entities, checks)
  lap("validate")

  texts = query_texts(logs.log)
  vocab_path = query_vocab(config, logs.log, out_dir)
  lap("query_vocab")

  boards = board_titles(logs.saves, d.board_titles_top)
  engaged, uncertain = engaged_queries(logs.log, d.engaged_queries_top, d.engaged_refresh_days)
  datasets = {k: e.dataset for k, e in entities.items()}
  ngrams = ngram_vocab(datasets, boards, engaged, d)
  ngrams.save(os.path.join(out_dir, "ngram_vocab"))
  lap("features")

  for kind, ds in encode_entity_tables(datasets, boards, engaged, ngrams, d).items():
    write_table_file(ds, os.path.join(out_dir, "entities", f"{kind}.parquet"),
                     encode_block(entities[kind].empty, kind, boards, engaged, ngrams, d))
  queries = query_table(texts, vocab_path, ngrams, d, workers=query_workers).materialize()
  write_table_file(queries, os.path.join(out_dir, "entities", "queries.parquet"))
  lap("entities")

  q_index = {q: i for i, q in enumerate(texts)}
  bad = {**{k: e.bad for k, e in entities.items()}, **logs.bad}
  judged, judged_bad = judged_negatives(config, raw_dir, out_dir,
                                        {k: e.index for k, e in entities.items()}, q_index,
                                        logs.log)
  if judged_bad is not None:
    bad["judged_negatives"] = judged_bad
  tokens = pq.read_table(os.path.join(out_dir, "entities", "queries.parquet"),
                         columns=["tokens"])["tokens"].to_pylist()
  pairs, dropped = write_pairs(config, logs.log, q_index,
                               [np.asarray(t, np.int32) for t in tokens], out_dir)
  lap("pairs")

  with open(vocab_path, encoding="utf-8") as f:
    query_vocab_size = len(f.read().splitlines())
  summary = dict(
      vocab=dict(query=query_vocab_size, trigram=len(ngrams.trigrams),
                 unigram=len(ngrams.unigrams), bigram=len(ngrams.bigrams), V=ngrams.size),
      query_vocab_source=d.query_vocab_file or "learned",
      entities=dict(pins=len(entities["pins"].index), products=len(entities["products"].index),
                    queries=len(texts)),
      pairs=pairs, dropped_pairs=dropped, bad_rows=bad, judged_negatives=judged,
      raw_rows=raw_rows, split=logs.split,
      features=dict(pins_with_board_titles=len(boards),
                    engaged_refresh_days=d.engaged_refresh_days,
                    engaged_lists_not_certified_exact={k: len(v) for k, v in uncertain.items()},
                    entities_with_engaged_queries={k: len({e for e, _ in engaged[k]})
                                                   for k in engaged}),
      seconds={k: round(v, 2) for k, v in seconds.items()},
      engine="ray", config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary
