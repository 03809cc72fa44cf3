"""`launch.py prepare`: raw Parquet tables -> the prepared directory of schema.py (SPEC §1), on Ray
Data.

One implementation, from a laptop to a cluster: the stages below are Ray Data pipelines that
stream Parquet row groups as blocks, so a run is bounded by the cluster's memory (with spilling),
not by one process's. Without `data.ray_address` Ray starts inside this process (no set-up); with
it the same stages run on that cluster (`ray start --head`; docs/scale_out.md).

Steps, in order (the module that runs each):
  0. ray_validate  Check every raw table before reading a value: its columns and their Arrow
     types (`schema.RAW_TYPES`), UTF-8 in string columns, and rows in the tables the configured
     tasks need. A defect there is a ValueError naming table, file and column (`launch.py`:
     exit 2). The rules and messages live in input_checks.py.
  1. ray_validate  Validate every raw row, one row group per task. A bad row is dropped AND
     counted by reason (log_rows.py, entity_rows.py; the first listed reason wins when a row has
     several defects), summed over blocks; nothing crashes on bad data and nothing is silent. A
     needed table left with no valid row is an error, not an empty entity table.
  2. ray_validate  Split the logs by time: eval = the last `eval_days` whole UTC days, the
     `gap_days` before them are dropped (SPEC §1 evaluation: a time gap between train and eval),
     train = all before; or the raw log's own `split` column.
  3. ray_features  Features from TRAIN-window logs only (no leakage into eval), as group-bys:
     board titles (top 10 per pin) and engaged queries (top 20 per entity and engagement type,
     merged window by window as the production refresh does), SPEC "Features that enrich
     entities". List fields are encoded item by item and concatenated, so no bigram spans two
     items; each field is capped at `field_max_tokens`, the entity at `max_entity_tokens`.
  4. ray_pairs / ray_features  Vocabularies: WordPiece for queries (learned from train queries
     unless `data.query_vocab_file`) and the trigram/unigram/bigram vocabularies of the entity
     tower, as aggregations of n-gram counts.
  5. ray_features / ray_pairs  Entity tables (pins, products, queries; Parquet, through a sink
     that writes them in entity_index order) and pair shards per task and split (ArrayRecord,
     `schema.encode_pair`), train pairs capped per entity; judged negatives.
  6. feature_examples  The training examples that carry their features (each train pair with its
     query's and positive's features, and shuffled entity streams for the random negatives:
     the training input holds no catalogue); then meta.json.

TensorFlow (WordPiece) is imported only by the stages that tokenise queries.

Usage:
  summary = prepare(get_config(), "/tmp/raw", "/tmp/prepared")   # joins Ray first if needed
"""

import concurrent.futures
import json
import os
import shutil
import tempfile
import time

import pyarrow.parquet as pq

# Up to this many distinct queries are tokenised on the driver when it learned the WordPiece
# vocabulary (TensorFlow is loaded there already; a batch at a time, so its working memory is one
# batch's): an actor costs a TensorFlow import, seconds and a process of its own, which only
# millions of queries repay. More go to QueryTokens actors.
DRIVER_QUERY_TOKENS = 2_000_000


def prepare(config, raw_dir: str, out_dir: str, query_workers: int = 1) -> dict:
  """Builds `out_dir` from the raw tables in `raw_dir`; returns the summary also in meta.json.

  Runs on the Ray instance this process has joined, else joins `config.data.ray_address` (a
  private local instance when empty, its object store `data.ray_object_store_gb`: beyond it
  Ray spills blocks to disk, so memory does not grow with the data). `query_workers`:
  QueryTokens actors (TensorFlow in each) when there are more queries than DRIVER_QUERY_TOKENS.
  Ray Data's sort shuffle is used for the run (ray_blocks.SMALL_SHUFFLE: it suits group-bys of
  a few columns)."""
  from omnisage.data.omnisearchsage.ray_blocks import SMALL_SHUFFLE, data_context
  from omnisage.data.omnisearchsage.ray_validate import check_inputs
  from omnisage.data.ray_runtime import init_ray
  clock = time.perf_counter()
  inputs = check_inputs(config, raw_dir)   # Parquet footers only: a bad table fails before Ray
  init_ray(config.data.get("ray_address") or None, config.data.get("ray_object_store_gb"))
  with data_context(SMALL_SHUFFLE):
    return _run_stages(config, raw_dir, out_dir, query_workers, inputs, clock)


def _run_stages(config, raw_dir: str, out_dir: str, query_workers: int, inputs: tuple,
                clock: float) -> dict:
  """prepare's stages after step 0 (`inputs`: check_inputs'), in the DataContext it set."""
  from omnisage.data.omnisearchsage.feature_examples import write_feature_examples
  from omnisage.data.omnisearchsage.ray_blocks import write_table_file
  from omnisage.data.omnisearchsage.ray_features import (
    encode_block,
    encode_entity_tables,
    feature_lists,
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
  from omnisage.data.omnisearchsage.ray_validate import validate_entities, validate_logs
  d, seconds = config.data, {}

  def lap(stage: str) -> None:
    seconds[stage] = time.perf_counter() - clock - sum(seconds.values())

  checks, raw_rows = inputs
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
    # Board titles and engaged queries, on disk by entity (removed once the tables are written).
    lists_dir = tempfile.mkdtemp(prefix=".feature_lists.", dir=out_dir)
    lists = feature_lists(logs, d, lists_dir)
    feature_counts = lists.summary()
    datasets = {k: e.dataset for k, e in entities.items()}
    ngrams = ngram_vocab(datasets, lists, d)
    ngrams.save(os.path.join(out_dir, "ngram_vocab"))
    lap("features")

    for kind, ds in encode_entity_tables(datasets, lists, ngrams, d).items():
      write_table_file(ds, os.path.join(out_dir, "entities", f"{kind}.parquet"),
                       encode_block(entities[kind].empty, kind, lists, ngrams, d))
    write_table_file(with_lexical(tokens.result(), ngrams),
                     os.path.join(out_dir, "entities", "queries.parquet"))
    shutil.rmtree(lists_dir)
  lap("entities")

  bad = {**{k: e.bad for k, e in entities.items()}, **logs.bad}
  judged, judged_bad = judged_negatives(config, raw_dir, out_dir,
                                        {k: e.index for k, e in entities.items()}, texts,
                                        logs.log)
  if judged_bad is not None:
    bad["judged_negatives"] = judged_bad
  tokens = pq.read_table(os.path.join(out_dir, "entities", "queries.parquet"),
                         columns=["tokens"])["tokens"]
  pairs, dropped = write_pairs(config, logs.log, texts, tokens, out_dir)
  lap("pairs")

  # 6. Training examples that carry their features (the catalogue-free training input).
  examples = write_feature_examples(config, out_dir)
  lap("examples")

  with open(vocab_path, encoding="utf-8") as f:
    query_vocab_size = len(f.read().splitlines())
  summary = dict(
      vocab=dict(query=query_vocab_size, trigram=len(ngrams.trigrams),
                 unigram=len(ngrams.unigrams), bigram=len(ngrams.bigrams), V=ngrams.size),
      query_vocab_source=d.query_vocab_file or "learned",
      entities=dict(pins=len(entities["pins"].index), products=len(entities["products"].index),
                    queries=len(texts)),
      pairs=pairs, dropped_pairs=dropped, bad_rows=bad, judged_negatives=judged,
      feature_examples={k: examples[k] for k in ("pairs", "negatives", "compat",
                                                 "hard_negatives")},
      raw_rows=raw_rows, split=logs.split,
      features=dict(feature_counts, engaged_refresh_days=d.engaged_refresh_days),
      seconds={k: round(v, 2) for k, v in seconds.items()},
      config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary


def prepare_workdir(config, workdir: str) -> dict:
  """`launch.py prepare` (and `demo`) of OmniSearchSage: `config.data.raw_dir`, or a synthetic
  world generated into <workdir>/raw when it is empty, -> prepared_dir_of(config, workdir), on
  the Ray instance of `config.data.ray_address` (a private local one when empty). Prints the
  bad-row table; returns the summary."""
  from omnisage.data.omnisearchsage import synthetic
  from omnisage.data.workdir import prepared_dir_of
  t0 = time.time()
  raw_dir, generated = config.data.raw_dir, False
  if not raw_dir:
    raw_dir = os.path.join(workdir, "raw")
    synthetic.generate(config.synthetic, config.seed, raw_dir)
    generated = True
  out_dir = prepared_dir_of(config, workdir)
  summary = prepare(config, raw_dir, out_dir)
  print_bad_rows(summary.get("bad_rows", {}))
  return {"raw_dir": raw_dir, "prepared_dir": out_dir, "synthetic": generated,
          "ray_address": config.data.get("ray_address") or "local",
          **{k: v for k, v in summary.items() if k != "config"},
          "step_seconds": summary.get("seconds"), "seconds": round(time.time() - t0, 2)}


def print_bad_rows(bad_rows: dict):
  """The dropped rows, by table and reason (nothing is dropped silently)."""
  if not bad_rows:
    return
  print("bad rows (dropped and counted):")
  for table, reasons in bad_rows.items():
    if isinstance(reasons, dict):
      for reason, count in sorted(reasons.items()):
        print(f"  {table:<14} {reason:<22} {count}")
    else:
      print(f"  {table:<14} {reasons}")
