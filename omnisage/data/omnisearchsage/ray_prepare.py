"""`launch.py prepare` on Ray Data: prepare.py's prepared directory from streaming Ray Data stages.

The `prepare` of launch.py with `--config.data.engine=ray` (prepare.prepare_workdir). Its output
is held to prepare.py's (tests/test_prepare_ray.py: the frozen digest of the tiny synthetic
world, tests/fixtures/prepare_tiny_digest.json, and the same directory as prepare() on a Home
Depot-style world with judged negatives), its errors are prepare's (input_checks.py), and its
summary has prepare's keys plus `engine: "ray"` (docs/scale_out.md, "prepare on Ray Data").

The stages, by the numbers of prepare.py's docstring, one module each:
  ray_blocks.py    raw row groups as blocks with global row numbers; bad rows summed over blocks;
                   group-bys as one call per block of co-located keys; the one-file table sink
  ray_validate.py  0-2: schema and empty-table checks, validation, duplicate ids, time split
  ray_features.py  3-5: board titles, engaged queries, n-gram vocabularies, entity tables
  ray_pairs.py     5: queries table (WordPiece), judged negatives, pair caps and ArrayRecord shards
The rules themselves (which row is valid, the errors, the queries table's columns) are shared
with prepare.py: entity_rows.py, log_rows.py, input_checks.py.

`seconds` has prepare's keys (validate, query_vocab, features, entities, pairs). The queries'
WordPiece tokens (prepare counts them in `query_vocab`) are computed in a driver thread from the
end of `query_vocab`, beside the features (on the driver for up to DRIVER_QUERY_TOKENS queries
when it learned the vocabulary, else by actors whose TensorFlow import overlaps the features),
and joined with their lexical ids in `entities`.

Usage (Ray joined first, e.g. omnisage/data/ray_runtime.init_ray):
  summary = prepare_on_ray(get_config(), "/tmp/raw", "/tmp/prepared")   # with the sort shuffle
"""

import concurrent.futures
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage.ray_blocks import SMALL_SHUFFLE, data_context, write_table_file
from omnisage.data.omnisearchsage.ray_features import (
  board_titles,
  encode_block,
  encode_entity_tables,
  engaged_queries,
  ngram_vocab,
)
from omnisage.data.omnisearchsage.ray_pairs import (
  judged_negatives,
  query_texts,
  query_tokens,
  query_vocab,
  with_lexical,
  write_pairs,
)
from omnisage.data.omnisearchsage.ray_validate import check_inputs, validate_entities, validate_logs

# Up to this many distinct queries are tokenised on the driver when it learned the WordPiece
# vocabulary (about 0.3 s per 10k queries there, against seconds for an actor to import
# TensorFlow); more go to QueryTokens actors.
DRIVER_QUERY_TOKENS = 100_000


def prepare_on_ray(config, raw_dir: str, out_dir: str, query_workers: int = 1,
                   shuffle: str | None = SMALL_SHUFFLE) -> dict:
  """prepare.prepare's directory and summary (also meta.json), computed on the Ray cluster this
  process has joined. `query_workers`: QueryTokens actors (TensorFlow in each), when there are
  more queries than DRIVER_QUERY_TOKENS. `shuffle`: Ray Data's shuffle strategy for the run
  (ray_blocks.SMALL_SHUFFLE, the sort shuffle; None: the caller's DataContext's)."""
  with data_context(shuffle):
    return run_stages(config, raw_dir, out_dir, query_workers)


def run_stages(config, raw_dir: str, out_dir: str, query_workers: int) -> dict:
  """prepare_on_ray's stages, in the DataContext it set."""
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

  with concurrent.futures.ThreadPoolExecutor(1) as background:
    # The queries' WordPiece tokens need only query_vocab.txt: their actors (each imports
    # TensorFlow, seconds) start now and run beside the features. A few queries, when the
    # driver learned the vocabulary (TensorFlow loaded here), are tokenised here instead.
    on_driver = not d.query_vocab_file and len(texts) <= DRIVER_QUERY_TOKENS
    tokens = background.submit(lambda: query_tokens(texts, vocab_path, d, workers=query_workers,
                                                    on_driver=on_driver).materialize())
    boards = board_titles(logs.saves, d.board_titles_top)
    engaged, uncertain = engaged_queries(logs.log, d.engaged_queries_top,
                                         d.engaged_refresh_days)
    datasets = {k: e.dataset for k, e in entities.items()}
    ngrams = ngram_vocab(datasets, boards, engaged, d)
    ngrams.save(os.path.join(out_dir, "ngram_vocab"))
    lap("features")

    for kind, ds in encode_entity_tables(datasets, boards, engaged, ngrams, d).items():
      write_table_file(ds, os.path.join(out_dir, "entities", f"{kind}.parquet"),
                       encode_block(entities[kind].empty, kind, boards, engaged, ngrams, d))
    write_table_file(with_lexical(tokens.result(), ngrams),
                     os.path.join(out_dir, "entities", "queries.parquet"))
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
