"""PinText training data (SPEC §2): (query words, item words) engagement pairs per task.

Tasks and where their pairs come from (real data, ../shared/datasets):
  homedepot  Home Depot search term -> title of a product judged relevant (relevance >= 2.67).
             TRAINING queries only: the protocol's test queries (homedepot.is_test_query) never
             enter; its validation queries (homedepot.is_validation_query) form the val split.
  bestbuy    Best Buy search query -> name of the clicked sku.
  movielens  MovieLens user tag -> title of the tagged movie.
Best Buy and MovieLens queries go to the val split when crc32(normalised text) % 10 == 0. A pair
is one distinct (normalised query, item): repeated clicks/tags of the same pair are counted
(`duplicates`) but kept once, so a handful of blockbuster queries do not dominate a task.

Tokenisation (no TensorFlow): `omnisage.data.text.unigrams` = NFKC + case folding, then words are
maximal runs of `\\w` (the lowercase word regex `\\w+`). The dictionary is built from the
configured tasks' TRAIN queries and item catalogues only (`min_count`, at most `max_vocab` words,
most frequent first, ties alphabetical; WANDS and validation queries never add words); id 0 is
padding and out-of-vocabulary words are dropped.

Written under <prepared>:
  vocab.txt                          line i = word of id i (line 0 "[PAD]")
  catalogue/<task>.parquet           item, text, ids (list<int32>): the items negatives come from
  <split>/<task>/pairs.parquet       query, item, query_ids (list<int32>), item_row (int32)
  wands.parquet                      query, query_class: the kNN eval queries (never trained on)
  meta.json                          counts, dropped rows, vocabulary size, tasks

Usage: `summary = prepare_pairs(config, "runs/pintext/prepared")`.
"""

import collections
import json
import os
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data import text
from omnisage.data.workdir import prepared_dir_of

TASKS = ("homedepot", "bestbuy", "movielens")
PAD = "[PAD]"
VAL_MODULUS = 10


def tokenize(s: str) -> list[str]:
  """Lowercase words: NFKC + casefold, then the regex \\w+ (punctuation separates words)."""
  return text.unigrams(s)


def is_val(query: str) -> bool:
  return zlib.crc32(text.normalize(query).encode("utf-8")) % VAL_MODULUS == 0


class TaskData:
  """One task's distinct pairs (query text, item id) per split, and its item catalogue."""

  def __init__(self, name: str, catalogue: dict[str, str]):
    self.name = name
    self.catalogue = catalogue            # item id -> text, in first-seen order
    self.pairs = {"train": {}, "val": {}}  # (normalised query, item) -> raw count
    self.dropped = collections.Counter()

  def add(self, query: str, item: str, val: bool):
    if item not in self.catalogue:
      self.dropped["unknown_item"] += 1
      return
    if not tokenize(query):
      self.dropped["query_without_words"] += 1
      return
    key = (text.normalize(query), item)
    split = self.pairs["val" if val else "train"]
    split[key] = split.get(key, 0) + 1

  def summary(self) -> dict:
    return {split: {"pairs": len(p), "duplicates": sum(p.values()) - len(p),
                    "queries": len({q for q, _ in p})} for split, p in self.pairs.items()} | {
        "catalogue": len(self.catalogue), "dropped": dict(self.dropped)}


def load_task(name: str, datasets: str) -> tuple[TaskData, dict]:
  """The pairs of one real task and the loader's bad-row report."""
  from omnisage.data.sources import bestbuy, homedepot, movielens
  if name == "homedepot":
    hd = homedepot.load(os.path.join(datasets, "homedepot-search-relevance"))
    task = TaskData(name, dict(zip(hd.products["product_id"].to_pylist(),
                                   hd.products["title"].to_pylist())))
    for q, items in sorted(hd.positives(test=False).items()):   # test queries never enter
      for item in sorted(items):
        task.add(q, item, homedepot.is_validation_query(q))
    return task, hd.bad.report()
  if name == "bestbuy":
    bb = bestbuy.load(os.path.join(datasets, "bestbuy-acm-small"))
    task = TaskData(name, dict(zip(bb.skus["sku"].to_pylist(), bb.skus["name"].to_pylist())))
    for q, sku in zip(bb.clicks["query"].to_pylist(), bb.clicks["sku"].to_pylist()):
      task.add(q, sku, is_val(q))
    return task, bb.bad.report()
  if name == "movielens":
    ml = movielens.load(os.path.join(datasets, "movielens-latest-small"))
    task = TaskData(name, {str(m): t for m, t in zip(ml.movies["movie"].to_pylist(),
                                                     ml.movies["title"].to_pylist())})
    for tag, movie in zip(ml.tags["tag"].to_pylist(), ml.tags["movie"].to_pylist()):
      task.add(tag, str(movie), is_val(tag))
    return task, ml.bad.report()
  raise ValueError(f"config field tasks: unknown task {name!r} (one of {', '.join(TASKS)})")


def load_wands(datasets: str) -> tuple[list[str], list[str], dict]:
  from omnisage.data.sources import wands
  w = wands.load(os.path.join(datasets, "wands"))
  return w.queries["query"].to_pylist(), w.queries["query_class"].to_pylist(), w.bad.report()


def synthetic_world(seed: int, tasks, topics: int = 6, words_per_topic: int = 10,
                    items_per_task: int = 60, pairs_per_task: int = 400):
  """Tiny topic world for tests: queries and items of a topic share its words; each task has its
  own items and its own slice of each topic's words (so tasks complement each other), and the
  evaluation queries are labelled by topic. Returns (tasks, wands queries, wands classes)."""
  rng = np.random.default_rng(seed)
  vocab = [[f"t{t}w{w}" for w in range(words_per_topic)] for t in range(topics)]
  noise = [f"noise{i}" for i in range(20)]
  out = []
  for k, name in enumerate(tasks):
    own = [[w for i, w in enumerate(ws) if i % len(tasks) != k or i < 2] for ws in vocab]
    catalogue, topic_of = {}, []
    for i in range(items_per_task):
      t = i % topics
      words = list(rng.choice(own[t], 4)) + list(rng.choice(noise, 1))
      catalogue[f"{name}-{i}"] = " ".join(words)
      topic_of.append(t)
    task = TaskData(name, catalogue)
    for _ in range(pairs_per_task):
      i = int(rng.integers(items_per_task))
      query = " ".join(rng.choice(own[topic_of[i]], 2))
      task.add(query, f"{name}-{i}", rng.random() < 0.1)
    out.append(task)
  queries, classes = [], []
  for t in range(topics):
    for _ in range(8):
      queries.append(" ".join(rng.choice(vocab[t], 2)))
      classes.append(f"topic {t}")
  return out, queries, classes


def build_vocab(tasks: list[TaskData], min_count: int, max_vocab: int) -> list[str]:
  """[PAD] + the words of the train queries and of the item catalogues, most frequent first.

  Catalogue titles are the corpus (known at serving time, as in the Home Depot protocol), and every
  catalogue item can be drawn as a negative, so its words get trained too."""
  counts = collections.Counter()
  for task in tasks:
    for q, item in task.pairs["train"]:
      counts.update(tokenize(q))
    for item_text in task.catalogue.values():
      counts.update(tokenize(item_text))
  words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
  return [PAD] + words[:max_vocab]


def encode(words: list[str], index: dict[str, int]) -> list[int]:
  return [index[w] for w in words if w in index]


def _write(path: str, table: pa.Table):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(table, path)


def write_prepared(out: str, tasks: list[TaskData], vocab: list[str], wands_queries: list[str],
                   wands_classes: list[str]) -> dict:
  index = {w: i for i, w in enumerate(vocab) if i}
  ids_type = pa.list_(pa.int32())
  with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  for task in tasks:
    items = list(task.catalogue)
    row = {item: i for i, item in enumerate(items)}
    _write(os.path.join(out, "catalogue", f"{task.name}.parquet"), pa.table({
        "item": pa.array(items, pa.string()),
        "text": pa.array([task.catalogue[i] for i in items], pa.string()),
        "ids": pa.array([encode(tokenize(task.catalogue[i]), index) for i in items], ids_type)}))
    for split, pairs in task.pairs.items():
      keys = sorted(pairs)
      _write(os.path.join(out, split, task.name, "pairs.parquet"), pa.table({
          "query": pa.array([q for q, _ in keys], pa.string()),
          "item": pa.array([i for _, i in keys], pa.string()),
          "query_ids": pa.array([encode(tokenize(q), index) for q, _ in keys], ids_type),
          "item_row": pa.array([row[i] for _, i in keys], pa.int32())}))
  _write(os.path.join(out, "wands.parquet"), pa.table({
      "query": pa.array(wands_queries, pa.string()),
      "query_class": pa.array(wands_classes, pa.string())}))
  return {"vocab": len(vocab) - 1}


def prepare_pairs(config, out: str) -> dict:
  """Reads the configured tasks' sources (or the synthetic world), writes <out>; returns counts."""
  d = config.data
  tasks = list(config.tasks)
  os.makedirs(out, exist_ok=True)
  bad = {}
  if d.synthetic:
    loaded, wq, wc = synthetic_world(config.seed, tasks)
    bad["wands"] = {"total": 0}
  else:
    if not os.path.isdir(d.datasets):
      raise FileNotFoundError(f"config field data.datasets: {d.datasets} is not a directory")
    loaded = []
    for name in tasks:
      task, bad[name] = load_task(name, d.datasets)
      loaded.append(task)
    wq, wc, bad["wands"] = load_wands(d.datasets)
  vocab = build_vocab(loaded, d.min_count, d.max_vocab)
  written = write_prepared(out, loaded, vocab, wq, wc)
  meta = {"tasks": {t.name: t.summary() for t in loaded}, "vocab": written["vocab"],
          "wands_queries": len(wq), "wands_classes": len(set(wc)),
          "bad_rows": {k: v.get("total", 0) for k, v in bad.items()},
          "bad_rows_by_reason": {k: v.get("by_reason", {}) for k, v in bad.items()},
          "synthetic": bool(d.synthetic)}
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def read_vocab(prepared: str) -> list[str]:
  path = os.path.join(prepared, "vocab.txt")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` first")
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def pad_ids(lists: list, length: int) -> np.ndarray:
  """int32 [len(lists), length]: word ids cropped or zero-padded (0 = padding)."""
  out = np.zeros((len(lists), length), np.int32)
  for r, ids in enumerate(lists):
    ids = ids[:length]
    out[r, :len(ids)] = ids
  return out


def read_pairs(prepared: str, split: str, task: str, query_len: int) -> dict[str, np.ndarray]:
  path = os.path.join(prepared, split, task, "pairs.parquet")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` for task {task}")
  t = pq.read_table(path)
  return {"query": pad_ids(t["query_ids"].to_pylist(), query_len),
          "item_row": t["item_row"].to_numpy().astype(np.int32)}


def read_catalogue(prepared: str, task: str, item_len: int) -> np.ndarray:
  path = os.path.join(prepared, "catalogue", f"{task}.parquet")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` for task {task}")
  return pad_ids(pq.read_table(path, columns=["ids"])["ids"].to_pylist(), item_len)


def read_wands(prepared: str) -> tuple[list[str], list[str]]:
  path = os.path.join(prepared, "wands.parquet")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` first")
  t = pq.read_table(path)
  return t["query"].to_pylist(), t["query_class"].to_pylist()


def prepare(config, workdir: str) -> dict:
  """`launch.py prepare` of PinText: word-id pairs per task -> prepared_dir_of(config, workdir)."""
  t0 = time.time()
  out = prepared_dir_of(config, workdir)
  meta = prepare_pairs(config, out)
  return {"prepared_dir": out, **meta, "seconds": round(time.time() - t0, 2)}
