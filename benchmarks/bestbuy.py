"""Best Buy query -> item Recall@10 on a time split: OmniSearchSage next to BM25 and popularity.

One run does everything: load the click logs (omnisage/data/sources/bestbuy.py),
write the raw tables, `prepare` them (time split of configs/omnisage_bestbuy.py: eval = the last
two weeks, Oct 18-31 2011, after a one-day gap), train in-process from scratch, then rank the WHOLE
sku catalogue (437 named skus) for every distinct eval query.

Protocol: an eval query is a normalised query (omnisage.data.text.normalize, as prepare does) with
at least one click in the eval window; its positives are the skus it clicked there. Queries never
seen in training are kept (reported as `eval_queries_unseen`). Metrics are those of
omnisage/train/evaluators/corpus.py: recall@10 per query (|top10 ∩ pos| / min(|pos|, 10)) and
pair_recall@10 per (query, positive) pair. Rows:
  popularity   the skus most clicked in the train window, the same list for every query
  bm25         bm25s over the sku names (omnisage/baselines/bm25.py: Snowball stemmer, stopwords)
  omnisage     the trained towers: query tower on the WordPiece tokens, entity tower on the
               product features (title + train-window engaged queries), dot product

Usage:
  .venv/bin/python benchmarks/bestbuy.py --datasets ../shared/datasets [--workdir runs/bestbuy]
  .venv/bin/python benchmarks/bestbuy.py --variant minilm      # MiniLM-initialised query tower
Prints a table and ends with one JSON line {"bestbuy": {...}}; bad input exits 2 with
{"bestbuy": {"error": ...}}.
"""

import argparse
import collections
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from configs import omnisage_bestbuy
from omnisage.data import text
from omnisage.data.sources import bestbuy
from omnisage.train.evaluators.corpus import corpus_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "bestbuy-acm-small"
K = 10
# Outputs of an earlier training run in the workdir: removed so every benchmark trains afresh
# (train_and_evaluate would otherwise resume from the last checkpoint).
TRAIN_OUTPUTS = ("checkpoints", "tensorboard", "train_metrics.jsonl", "eval_trained.json",
                 "eval_untrained.json")


def load_config(variant: str = ""):
  return omnisage_bestbuy.get_config(variant or None)


def eval_set(bb: bestbuy.BestBuy, start: int, end: int, sku_row: dict
             ) -> tuple[list[str], list[list[int]]]:
  """Distinct normalised queries clicked in [start, end) and their clicked corpus rows."""
  positives: dict[str, set] = collections.defaultdict(set)
  for q, sku, t in zip(bb.clicks["query"].to_pylist(), bb.clicks["sku"].to_pylist(),
                       bb.clicks["click_time"].to_pylist()):
    norm = text.normalize(q)
    if start <= t < end and norm and sku in sku_row:
      positives[norm].add(sku_row[sku])
  queries = sorted(positives)
  return queries, [sorted(positives[q]) for q in queries]


def popularity(bb: bestbuy.BestBuy, train_end: int, sku_row: dict) -> np.ndarray:
  """[corpus] train-window click counts (ties broken by catalogue order, deterministically)."""
  counts = np.zeros(len(sku_row))
  for sku, t in zip(bb.clicks["sku"].to_pylist(), bb.clicks["click_time"].to_pylist()):
    if t < train_end and sku in sku_row:
      counts[sku_row[sku]] += 1
  return counts - np.arange(len(counts)) * 1e-6


def _fresh_run(workdir: str) -> None:
  for name in TRAIN_OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def trained_embeddings(config, workdir: str, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(query [n, D], product [N, D]) embeddings of the newest checkpoint in workdir."""
  from omnisage.train.omnisearchsage.towers import TrainedTowers
  towers = TrainedTowers(config, workdir, batch_size=config.eval.batch_size)
  return towers.query_texts(queries), towers.entities("products")


def run(dataset_dir: str, workdir: str, config) -> dict:
  """Loads, writes raw tables, prepares, trains, evaluates; returns the summary."""
  from omnisage.baselines.bm25 import BM25Index
  from omnisage.data.omnisearchsage import prepare as prepare_lib
  from omnisage.train.omnisearchsage.trainer import train_and_evaluate

  clock = time.perf_counter()
  bb = bestbuy.load(dataset_dir)
  loaded = bb.summary()
  raw_dir = os.path.join(workdir, "raw")
  written = bestbuy.to_raw_tables(bb, raw_dir, config.bestbuy.max_pairs_per_sku, config.seed)
  config.data.raw_dir = raw_dir
  prepared_dir = config.data.prepared_dir or os.path.join(workdir, "prepared")
  prepared = prepare_lib.prepare(config, raw_dir, prepared_dir)
  split = prepared["split"]
  print(f"{loaded['clicks']} clicks ({loaded['bad_rows']['total']} bad rows dropped), "
        f"{written['coclick']['pairs']} co-click pairs; pairs train {prepared['pairs']['train']}"
        f", eval {prepared['pairs']['eval']}", flush=True)

  for task, weight in config.tasks.items():
    # A task needs train pairs to batch and eval pairs for the trainer's evaluator; a small slice
    # may have neither (co-clicks are rare): train without it rather than fail.
    if task in prepared["pairs"]["train"] and weight > 0 and not all(
        prepared["pairs"][s][task] for s in ("train", "eval")):
      print(f"{task}: no train or no eval pairs, task switched off", flush=True)
      config.tasks[task] = 0
  _fresh_run(workdir)
  trained = train_and_evaluate(config, workdir)

  corpus = pq.read_table(os.path.join(prepared_dir, "entities", "products.parquet"),
                         columns=["id"])["id"].to_pylist()
  sku_row = {sku: i for i, sku in enumerate(corpus)}
  queries, positives = eval_set(bb, split["eval_start"], split["eval_end"], sku_row)
  if not queries:
    raise ValueError(f"{dataset_dir}: no clicks in the eval window; check data.eval_days")
  # "unseen": no click in the train window (the queries table holds every log query).
  train_queries = {text.normalize(q) for q, t in zip(bb.clicks["query"].to_pylist(),
                                                     bb.clicks["click_time"].to_pylist())
                   if t < split["train_end"]}

  names = bb.skus.to_pydict()
  name_of = dict(zip(names["sku"], names["name"]))
  methods = {}
  pop = popularity(bb, split["train_end"], sku_row)
  methods["popularity"] = corpus_metrics(lambda rows: np.tile(pop, (len(rows), 1)), positives, K)
  bm25 = BM25Index([name_of[s] for s in corpus]).scores(queries)
  methods["bm25"] = corpus_metrics(lambda rows: bm25[rows], positives, K)
  # A query sharing no term with any name scores 0 everywhere: its positives tie with the whole
  # catalogue, and pair_recall counts ties for the positive (retrieval_metrics), so such queries
  # are pair-recall hits. Their number says how much of BM25's pair_recall that is.
  methods["bm25"]["no_match_queries"] = int(np.sum(~bm25.any(axis=1)))
  q, p = trained_embeddings(config, workdir, queries)
  methods["omnisage"] = corpus_metrics(lambda rows: q[rows] @ p.T, positives, K)
  methods["omnisage"]["train_seconds"] = trained["train_seconds"]
  for m in methods.values():
    m.setdefault("train_seconds", 0.0)
  return {
      "dataset": dataset_dir, "clicks": loaded["clicks"], "bad_rows": loaded["bad_rows"]["total"],
      "coclick_pairs": written["coclick"]["pairs"], "pairs": prepared["pairs"],
      "split": {k: split[k] for k in ("train_end", "eval_start", "eval_end", "log_rows")},
      "corpus": len(corpus), "eval_queries": len(queries),
      "eval_pairs": int(sum(len(x) for x in positives)),
      "eval_queries_unseen": sum(1 for x in queries if x not in train_queries),
      "steps": trained["steps"], "trainer_sampled_recall@10": trained["recall@10"],
      "methods": methods, "seconds": round(time.perf_counter() - clock, 1)}


def print_table(summary: dict) -> None:
  print(f"\nBest Buy query -> sku, eval window {summary['eval_queries']} queries "
        f"({summary['eval_queries_unseen']} unseen in train), {summary['eval_pairs']} pairs, "
        f"corpus {summary['corpus']} skus")
  print(f"{'method':<12} {'recall@10':>10} {'pair_recall@10':>15} {'train s':>8}")
  for name, m in summary["methods"].items():
    print(f"{name:<12} {m[f'recall@{K}']:>10.3f} {m[f'pair_recall@{K}']:>15.3f} "
          f"{m['train_seconds']:>8.1f}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--datasets", default=os.path.join(ROOT, "..", "shared", "datasets"),
                 help=f"the datasets root; the data is read from <datasets>/{DATASET}")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bestbuy"))
  p.add_argument("--variant", default="", choices=("", "minilm", "tiny"),
                 help="configs/omnisage_bestbuy.py variant")
  p.add_argument("--steps", type=int, default=0, help="override train.steps (0: the config's)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logger = logging.getLogger("omnisage")   # the trainer's progress lines on stderr
  logger.setLevel(logging.INFO)
  logger.addHandler(logging.StreamHandler(sys.stderr))
  logger.propagate = False   # some library configures the root logger: print each line once
  logging.getLogger("bm25s").setLevel(logging.WARNING)
  config = load_config(args.variant)
  if args.steps:
    config.train.steps = args.steps
  summary = run(os.path.join(args.datasets, DATASET), args.workdir, config)
  print_table(summary)
  print(json.dumps({"bestbuy": summary}))
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (OSError, ValueError) as error:   # a missing dataset or a bad file: say so, exit 2
    print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"bestbuy": {"error": str(error)}}))
    sys.exit(2)
