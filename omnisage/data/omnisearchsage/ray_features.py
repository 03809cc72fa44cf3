"""Steps 3-5 of `launch.py prepare` on Ray Data: features, n-gram vocabularies, entity tables.

What an entity's text becomes, as prepare.py computes it from the TRAIN window only: board titles
(top `board_titles_top` per pin) and engaged queries (top `engaged_queries_top` per entity and
engagement type, with the incremental merge of `engaged_refresh_days`), then the trigram /
unigram / bigram vocabularies over every entity field text, then the encoded entity tables. Each
is a group-by or an aggregation over blocks whose result equals prepare's exactly: the features
are per key (pin; kind, entity, engagement), n-gram counts are sums, and the encoding is
entity_rows.encode_entities per block.

The board-title and engaged-query lists come back to the driver and are broadcast (ray.put) to
the encoding blocks; at production scale a join on entity_index would replace that.

Usage:
  boards = board_titles(logs.saves, d.board_titles_top)
  engaged, uncertain = engaged_queries(logs.log, d.engaged_queries_top, d.engaged_refresh_days)
  vocab = ngram_vocab(datasets, boards, engaged, d)
  tables = encode_entity_tables(datasets, boards, engaged, vocab, d)   # {kind: dataset}
"""

import collections
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from omnisage.data import text
from omnisage.data.omnisearchsage import features
from omnisage.data.omnisearchsage.entity_rows import encode_entities, field_items
from omnisage.data.omnisearchsage.log_rows import DAY
from omnisage.data.omnisearchsage.ray_validate import TEXT_FIELDS


# --- 3. features: board titles and engaged queries as group-bys ----------------------------------
def train_rows(ds: ray.data.Dataset, column: str, value) -> ray.data.Dataset:
  return ds.map_batches(lambda t: t.filter(pc.equal(t[column], value)), batch_format="pyarrow")


def board_titles(saves: ray.data.Dataset, top: int) -> dict:
  """{pin entity_index: titles}, as features.board_titles_per_pin over the train-window saves:
  the global word commonness F(w) is a groupby(word).sum(), the per-pin choice a map_groups."""
  train = train_rows(saves, "in_train", True).materialize()
  if not train.count():
    return {}

  def word_counts(t: pa.Table) -> pa.Table:
    c: collections.Counter = collections.Counter()
    for title, n in collections.Counter(t["title"].to_pylist()).items():
      for w in set(text.words(title)):
        c[w] += n
    return pa.table(dict(word=pa.array(list(c), pa.string()),
                         count=pa.array(list(c.values()), pa.int64())))

  freq = {r["word"]: int(r["sum(count)"]) for r in train.map_batches(
      word_counts, batch_format="pyarrow").groupby("word").sum("count").take_all()}
  freq_ref = ray.put(freq)

  def per_pin(t: pa.Table) -> pa.Table:
    titles = features.select_board_titles(collections.Counter(t["title"].to_pylist()), top,
                                           ray.get(freq_ref))
    return pa.table(dict(pin=pa.array([t["pin"][0].as_py()], pa.int64()),
                         titles=pa.array([titles], pa.list_(pa.string()))))

  rows = train.select_columns(["pin", "title"]).groupby("pin").map_groups(
      per_pin, batch_format="pyarrow").take_all()
  return {r["pin"]: list(r["titles"]) for r in rows}


def engaged_group(t: pa.Table, top: int, refresh_days: int) -> pa.Table:
  """The engaged-query list of ONE (kind, entity, engagement) key, as prepare._engaged_queries:
  refresh_days 0 a full recompute, else windows of refresh_days days merged in order. The merge
  is per key, so a group-by computes exactly the same lists."""
  key = (t["entity"][0].as_py(), t["engagement"][0].as_py())
  queries = np.asarray(t["query"].to_pylist(), object)

  def counts(sel):
    return {key: collections.Counter(queries[sel].tolist())}

  if not refresh_days:
    everything = counts(np.ones(len(queries), bool))
    current, uncertain = features.top_engaged_queries(everything, top), False
  else:
    window = t["timestamp"].to_numpy() // (refresh_days * DAY)
    current, uncertain = {}, False
    for w in np.unique(window):
      new = counts(window == w)
      uncertain |= bool(features.uncertain_merge_keys(current, new, top))
      current = features.merge_engaged_queries(current, new, top)
  ranked = current.get(key, [])
  return pa.table(dict(
      kind=pa.array([t["kind"][0].as_py()]), entity=pa.array([key[0]], pa.int64()),
      engagement=pa.array([key[1]], pa.int64()),
      queries=pa.array([[q for q, _ in ranked]], pa.list_(pa.string())),
      counts=pa.array([[c for _, c in ranked]], pa.list_(pa.int64())),
      uncertain=pa.array([uncertain])))


def engaged_queries(log: ray.data.Dataset, top: int, refresh_days: int) -> tuple[dict, dict]:
  """({kind: {(entity, engagement): [(query, count)]}}, {kind: uncertain keys}) from the train
  rows engaging pins and products: one groupby(kind, entity, engagement).map_groups."""
  train = log.map_batches(lambda t: t.filter(pc.and_(pc.equal(t["split"], 0), pc.is_in(
      t["kind"], pa.array(["pins", "products"])))).select(
      ["kind", "entity", "engagement", "query", "timestamp"]), batch_format="pyarrow")
  rows = train.groupby(["kind", "entity", "engagement"]).map_groups(
      engaged_group, fn_kwargs=dict(top=top, refresh_days=refresh_days),
      batch_format="pyarrow").take_all()
  engaged: dict = {"pins": {}, "products": {}}
  uncertain: dict = {"pins": set(), "products": set()}
  for r in rows:
    key = (r["entity"], r["engagement"])
    engaged[r["kind"]][key] = list(zip(r["queries"], (int(c) for c in r["counts"])))
    if r["uncertain"]:
      uncertain[r["kind"]].add(key)
  return engaged, uncertain


# --- 4. n-gram vocabularies as an aggregation ----------------------------------------------------
def block_items(t: pa.Table, boards: dict, engaged: dict) -> list:
  """field_items of the entities of one block (boards/engaged keyed by entity_index)."""
  index = t["entity_index"].to_numpy()
  ent = {"ids": t["id"].to_numpy(zero_copy_only=False),
         **{f: t[f].to_numpy(zero_copy_only=False) for f in TEXT_FIELDS}}
  local_boards = {i: boards[e] for i, e in enumerate(index.tolist()) if e in boards}
  position = {e: i for i, e in enumerate(index.tolist())}
  local_engaged = {(position[e], c): v for (e, c), v in engaged.items() if e in position}
  return field_items(ent, local_boards, local_engaged)


def ngram_counts(texts) -> pa.Table:
  """Per-vocabulary n-gram counts of `texts` (each occurrence counts), as NgramVocab.build
  counts them; sums of these over blocks are the counts of the whole corpus."""
  words: collections.Counter = collections.Counter()
  pairs: collections.Counter = collections.Counter()
  for t, c in collections.Counter(texts).items():
    ws = text.words(text.normalize(t))
    for w in ws:
      words[w] += c
    for a, b in zip(ws[:-1], ws[1:]):
      pairs[a + text.BOUNDARY + b] += c
  tri: collections.Counter = collections.Counter()
  for w, c in words.items():
    for g in text.word_trigrams(w):
      tri[g] += c
  vocab, token, count = [], [], []
  for name, counter in (("trigram", tri), ("unigram", words), ("bigram", pairs)):
    vocab += [name] * len(counter)
    token += list(counter)
    count += list(counter.values())
  return pa.table(dict(vocab=pa.array(vocab, pa.string()), token=pa.array(token, pa.string()),
                       count=pa.array(count, pa.int64())))


def ngram_vocab(datasets: dict, boards: dict, engaged: dict, d) -> text.NgramVocab:
  """NgramVocab.build over every entity field text: per-block counts, one groupby().sum()."""
  refs = ray.put((boards, engaged))

  def counts_of(kind):
    def fn(t: pa.Table) -> pa.Table:
      b, e = ray.get(refs)
      items = block_items(t, b if kind == "pins" else {}, e[kind])
      return ngram_counts(x for per in items for f in per for x in f)
    return fn

  parts = [ds.map_batches(counts_of(k), batch_format="pyarrow") for k, ds in datasets.items()]
  summed = parts[0].union(*parts[1:]).groupby(["vocab", "token"]).sum("count").take_all()
  by_vocab: dict = {"trigram": [], "unigram": [], "bigram": []}
  for r in summed:
    by_vocab[r["vocab"]].append((-int(r["sum(count)"]), r["token"]))
  sizes = {"trigram": d.trigram_vocab, "unigram": d.unigram_vocab, "bigram": d.bigram_vocab}
  return text.NgramVocab(*[[tok for _, tok in sorted(by_vocab[v])[:sizes[v]]]
                           for v in ("trigram", "unigram", "bigram")])


# --- 5. entity tables ----------------------------------------------------------------------------
def encode_block(t: pa.Table, kind: str, boards: dict, engaged: dict, vocab: text.NgramVocab,
                 d) -> pa.Table:
  """The entities/<kind>.parquet rows of one block of valid entities (EntityStage.dataset)."""
  tokens, fields = encode_entities(block_items(t, boards if kind == "pins" else {}, engaged[kind]),
                                   vocab, d, f"encode {kind}")
  return pa.table(dict(entity_index=t["entity_index"], id=t["id"], tokens=tokens, fields=fields,
                       legacy=t["legacy"], visual=t["visual"], title=t["title"]))


def encode_entity_tables(datasets: dict, boards: dict, engaged: dict, vocab: text.NgramVocab,
                         d) -> dict:
  """{kind: dataset of the entities/<kind>.parquet columns}: encode_block per block."""
  refs = ray.put((boards, engaged, vocab))

  def encoder(kind):
    def fn(t: pa.Table) -> pa.Table:
      return encode_block(t, kind, *ray.get(refs), d)
    return fn

  return {k: ds.map_batches(encoder(k), batch_format="pyarrow") for k, ds in datasets.items()}


def write_entity_tables(tables: dict, out_dir: str) -> dict:
  """write_parquet of each entity dataset into <out_dir>/entities/<kind>/ (a directory of files
  in entity_index order); returns {kind: directory}."""
  dirs = {}
  for kind, ds in tables.items():
    path = os.path.join(out_dir, "entities", kind)
    ds.sort("entity_index").write_parquet(path)
    dirs[kind] = path
  return dirs


def read_entity_table(directory: str) -> pa.Table:
  """One table of a write_entity_tables directory, rows in entity_index order."""
  table = pq.read_table(directory)
  return table.take(pc.sort_indices(table["entity_index"]))
