"""Hard-negative mining: a checkpoint's and BM25's top results for every training query, taken
from a rank window and never a known positive, written as the table the input pipeline joins.

ANCE (Xiong et al. 2021) refreshes negatives from the model being trained: results it ranks high
but that are not positives are the negatives it has not learned yet. The window skips the very
top ranks (`mine.rank_lo`), where unlabelled true positives crowd in (RocketQA's false-negative
problem, Qu et al. 2021), and stops at `mine.rank_hi`. BM25 contributes lexical look-alikes,
which a text-matching query tower must learn to tell apart.

Per task (`mine.tasks`), every distinct training query is embedded (or BM25-scored) against the
task's whole corpus, in chunks of `mine.chunk_queries` queries. Each chunk is written to
<table dir>/.mining/<task>/chunk-NNNNN.parquet when done, so a killed job resumes from the
chunks it finished (settings.json pins the checkpoint and window; other settings start afresh).
The merged table is <table dir>/<task>.mined.parquet (hard_negatives.py), source "model" or
"bm25". The training examples embed each query's hard negatives (feature_examples.py), so mining
ends by rebuilding <prepared>/feature_examples: the next `train` reads the new negatives and does
not pay for the rebuild. A refresh schedule is `train` to step N, `mine`, `train` to step 2N, ...

Usage: `summary = mine_hard_negatives(config, workdir)`   # launch.py mine
"""

import json
import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage import feature_examples, schema
from omnisage.data.omnisearchsage.hard_negatives import table_dir, write_table
from omnisage.data.omnisearchsage.pipeline import read_pairs
from omnisage.train.omnisearchsage.towers import TrainedTowers

log = logging.getLogger(__name__)
ALL_PAIRS = 1 << 62


def positives_by_query(prepared: str, task: str, config) -> dict[int, set[int]]:
  """{query row: entity rows paired with it} over the task's training pairs."""
  pairs = read_pairs(prepared, "train", task, ALL_PAIRS, config.seed, config.data.batch_query_len)
  out: dict[int, set[int]] = {}
  for query, entity in zip(pairs["query_ids"].tolist(), pairs["pos_ids"].tolist()):
    out.setdefault(query, set()).add(entity)
  return out


def window(ranked: np.ndarray, positives: set[int], lo: int, hi: int, keep: int) -> list[int]:
  """The first `keep` entities of ranks [lo, hi) (0-based) of one ranked row, positives skipped."""
  return [int(e) for e in ranked[lo:hi] if int(e) not in positives][:keep]


def top_ranked(scores: np.ndarray, hi: int) -> np.ndarray:
  """[n, hi] entity rows by descending score (ties: lower row first)."""
  return np.argsort(-scores, axis=1, kind="stable")[:, :hi]


def mine_hard_negatives(config, workdir: str) -> dict:
  m = config.mine
  t0 = time.time()
  towers = TrainedTowers(config, workdir, step=m.get("step"))
  prepared = towers.prepared
  out_dir = table_dir(prepared, config.data.get("hard_negatives_dir", ""))
  settings = {"step": int(towers.step), "rank_lo": int(m.rank_lo), "rank_hi": int(m.rank_hi),
              "per_query": int(m.per_query), "sources": sorted(m.sources),
              "chunk_queries": int(m.chunk_queries)}
  if m.rank_lo < 0 or m.rank_hi <= m.rank_lo or m.per_query < 1:
    raise ValueError(f"config field mine: need 0 <= rank_lo < rank_hi and per_query >= 1, got "
                     f"{settings}")
  unknown = set(m.sources) - {"model", "bm25"}
  if unknown:
    raise ValueError(f"config field mine.sources: {sorted(unknown)} unknown (model, bm25)")
  summary = {"step": int(towers.step), "tables": {}, "settings": settings}
  for task in m.tasks:
    if task not in schema.TASK_ENTITY:
      raise ValueError(f"config field mine.tasks: {task!r} is not one of "
                       f"{sorted(schema.TASK_ENTITY)}")
    if config.tasks[task] <= 0:   # not trained: nothing to mine for
      continue
    summary["tables"][task] = mine_task(config, towers, task, out_dir, settings)
  summary["feature_examples"] = refresh_examples(config, prepared)
  summary["seconds"] = round(time.time() - t0, 2)
  return summary


def refresh_examples(config, prepared: str) -> dict:
  """Rebuilds the training examples with the tables just written (always: a table rewritten with
  the same size may keep its mtime within the file system's resolution); their counts."""
  t0 = time.time()
  directory = feature_examples.ensure_feature_examples(config, prepared, rebuild=True)
  meta = feature_examples.read_meta(prepared)
  log.info("feature examples rebuilt with hard negatives of %s: %s", meta["hard_negatives"],
           meta["pairs"])
  return {"examples": int(sum(meta["pairs"].values())), "pairs": meta["pairs"],
          "hard_negatives": meta["hard_negatives"], "directory": directory,
          "seconds": round(time.time() - t0, 2)}


def mine_task(config, towers: TrainedTowers, task: str, out_dir: str, settings: dict) -> dict:
  kind = schema.TASK_ENTITY[task]
  positives = positives_by_query(towers.prepared, task, config)
  queries = np.array(sorted(positives), np.int64)
  parts = os.path.join(out_dir, ".mining", task)
  settings_path = os.path.join(parts, "settings.json")
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      if json.load(f) != settings:   # another checkpoint or window: the parts are stale
        shutil.rmtree(parts)
  os.makedirs(parts, exist_ok=True)
  with open(settings_path, "w") as f:
    json.dump(settings, f)

  store = towers.stores[kind]
  corpus = towers.entities(kind) if "model" in settings["sources"] else None
  bm25 = None
  if "bm25" in settings["sources"]:
    from omnisage.baselines.bm25 import BM25Index
    bm25 = BM25Index(entity_texts(towers.prepared, kind))
    query_text = entity_texts(towers.prepared, "queries")
  size, resumed = settings["chunk_queries"], 0
  for c, start in enumerate(range(0, len(queries), size)):
    path = os.path.join(parts, f"chunk-{c:05d}.parquet")
    if os.path.exists(path):
      resumed += 1
      continue
    chunk = queries[start:start + size]
    rows = {"query_index": [], "entity_index": [], "source": []}
    ranked = {}
    if corpus is not None:
      q = towers.queries(towers.stores["queries"].tokens[chunk])
      ranked["model"] = top_ranked(q @ corpus.T, settings["rank_hi"])
    if bm25 is not None:
      ranked["bm25"] = top_ranked(bm25.scores([query_text[q] for q in chunk]),
                                  settings["rank_hi"])
    for source, top in ranked.items():
      for query, row in zip(chunk.tolist(), top):
        found = window(row, positives[query], settings["rank_lo"], settings["rank_hi"],
                       settings["per_query"])
        rows["query_index"] += [query] * len(found)
        rows["entity_index"] += found
        rows["source"] += [source] * len(found)
    write_table(path, rows["query_index"], rows["entity_index"], rows["source"])
  merged = pq.read_table(sorted(os.path.join(parts, f) for f in os.listdir(parts)
                                if f.endswith(".parquet")))
  total = write_table(os.path.join(out_dir, f"{task}.mined.parquet"),
                      merged.column("query_index").to_numpy(),
                      merged.column("entity_index").to_numpy(),
                      merged.column("source").to_pylist())
  by_source = {s: int(n) for s, n in zip(*np.unique(np.asarray(
      merged.column("source").to_pylist(), object).astype(str), return_counts=True))}
  log.info("mined %s: %d negatives for %d queries (%s), %d chunks resumed", task, total,
           len(queries), by_source, resumed)
  return {"queries": int(len(queries)), "negatives": total, "by_source": by_source,
          "chunks": -(-len(queries) // size), "chunks_resumed": resumed,
          "corpus": int(store.size), "table": os.path.join(out_dir, f"{task}.mined.parquet")}


def entity_texts(prepared: str, kind: str) -> list[str]:
  """Row-aligned texts of an entity table: queries' text, pins' and products' title."""
  column = "text" if kind == "queries" else "title"
  table = pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet"), columns=[column])
  return [t or "" for t in table.column(column).cast(pa.string()).to_pylist()]
