"""Steps 3-5 of `launch.py prepare` on Ray Data: features, n-gram vocabularies, entity tables.

What an entity's text becomes, as prepare.py computes it from the TRAIN window only: board titles
(top `board_titles_top` per pin) and engaged queries (top `engaged_queries_top` per entity and
engagement type, with the incremental merge of `engaged_refresh_days`), then the trigram /
unigram / bigram vocabularies over every entity field text, then the encoded entity tables. Each
is a group-by or an aggregation over blocks whose result equals prepare's exactly: the features
are per key (pin; kind, entity, engagement), n-gram counts are sums, and the encoding is
entity_rows.encode_entities per block. A group-by is one call per block of co-located keys
(ray_blocks.map_key_blocks), never a Python call per key: 50k engaged-query keys cost seconds.

The engaged-query lists of all keys of a block are computed at once in Arrow (`merge_window`):
the same lists and the same uncertain keys as features.merge_engaged_queries and
uncertain_merge_keys key by key, which tests/test_prepare_ray.py checks against a key-by-key
reference on random logs with ties, non-ASCII queries and several windows.

The board-title and engaged-query lists never come back to the driver: they are written by
OrderedParquetSink as Parquet files sorted by entity (`FeatureLists`), and each block of entities
reads only the lists of its own entity_index range (row groups skipped by their statistics). That
is a join on entity_index, as a feature store serves it: no process holds every list, and a
block's work does not grow with the number of lists.

Usage:
  lists = feature_lists(logs, d, directory)       # board_titles + engaged_queries, on disk
  vocab = ngram_vocab(datasets, lists, d)
  tables = encode_entity_tables(datasets, lists, vocab, d)   # {kind: dataset}
"""

import collections
import dataclasses
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
from omnisage.data.omnisearchsage.ray_blocks import (
  WHOLE_BLOCKS,
  driver_table,
  map_key_blocks,
  sum_by,
  write_table_file,
)
from omnisage.data.omnisearchsage.ray_validate import TEXT_FIELDS


# --- 3. features: board titles and engaged queries as group-bys ----------------------------------
def train_rows(ds: ray.data.Dataset, column: str, value) -> ray.data.Dataset:
  return ds.map_batches(lambda t: t.filter(pc.equal(t[column], value)), **WHOLE_BLOCKS)


BOARD_TITLES = pa.schema([("pin", pa.int64()), ("titles", pa.list_(pa.string()))])


def board_titles(saves: ray.data.Dataset, top: int, path: str) -> str:
  """Writes (pin entity_index, titles) sorted by pin to `path`, as features.board_titles_per_pin
  over the train-window saves: the global word commonness F(w) is a sum by word, then every
  pin's choice (features.select_board_titles) in one call per block of saves co-located by pin."""
  train = train_rows(saves, "in_train", True).select_columns(["pin", "title"]).materialize()
  if not train.count():
    pq.write_table(BOARD_TITLES.empty_table(), path)
    return path

  def word_counts(t: pa.Table) -> pa.Table:
    c: collections.Counter = collections.Counter()
    for title, n in collections.Counter(t["title"].to_pylist()).items():
      for w in set(text.words(title)):
        c[w] += n
    return pa.table(dict(word=pa.array(list(c), pa.string()),
                         count=pa.array(list(c.values()), pa.int64())))

  freq = driver_table(sum_by(train.map_batches(word_counts, **WHOLE_BLOCKS), ["word"]),
                      word_counts(pa.table(dict(title=pa.array([], pa.string())))))
  freq_ref = ray.put(dict(zip(freq["word"].to_pylist(), freq["count"].to_pylist())))

  def per_pin(t: pa.Table) -> pa.Table:
    # (pin, title) save counts, then each pin's titles (the pins of a block are whole).
    counts = t.group_by(["pin", "title"], use_threads=False).aggregate([("title", "count")])
    per: dict = collections.defaultdict(dict)
    for p, title, n in zip(counts["pin"].to_pylist(), counts["title"].to_pylist(),
                           counts["title_count"].to_pylist()):
      per[p][title] = n
    word_freq = ray.get(freq_ref)
    titles = [features.select_board_titles(c, top, word_freq) for c in per.values()]
    return pa.table([pa.array(list(per), pa.int64()), pa.array(titles, pa.list_(pa.string()))],
                    schema=BOARD_TITLES)

  write_table_file(map_key_blocks(train, ["pin"], per_pin), path, BOARD_TITLES.empty_table(),
                   key="pin")
  return path


ENGAGED_LISTS = pa.schema([("kind", pa.string()), ("entity", pa.int64()),
                          ("engagement", pa.int64()), ("queries", pa.list_(pa.string())),
                          ("counts", pa.list_(pa.int64())), ("uncertain", pa.bool_())])
KEY = ["entity", "engagement"]   # an engaged-query list's key within one entity kind


def ranked(t: pa.Table, top: int) -> tuple[pa.Table, np.ndarray]:
  """(key, query, count) rows -> the first `top` of every key in features._top_list's order
  (count descending, then query: Arrow orders strings by UTF-8 bytes, i.e. by code point, as
  Python does), and a bool per kept row: the last of its key's list."""
  t = t.sort_by([("entity", "ascending"), ("engagement", "ascending"), ("count", "descending"),
                 ("query", "ascending")])
  e, g = t["entity"].to_numpy(), t["engagement"].to_numpy()
  first = np.r_[True, (e[1:] != e[:-1]) | (g[1:] != g[:-1])]
  starts = np.flatnonzero(first)
  rank = np.arange(len(e)) - np.repeat(starts, np.diff(np.r_[starts, len(e)]))
  keep = rank < top
  last = np.r_[first[1:], True] | (rank == top - 1)
  return t.filter(pa.array(keep)), last[keep]


def key_codes(t: pa.Table, keys: pa.Table) -> np.ndarray:
  """The row of `keys` (unique (entity, engagement) rows) that each row of `t` has, -1: none."""
  table = keys.select(KEY).append_column("i", pa.array(np.arange(keys.num_rows)))
  joined = t.select(KEY).append_column("j", pa.array(np.arange(t.num_rows))).join(
      table, KEY, join_type="inner", use_threads=False)
  out = np.full(t.num_rows, -1, np.int64)
  out[joined["j"].to_numpy()] = joined["i"].to_numpy()
  return out


def merge_window(current: pa.Table, new: pa.Table, top: int) -> tuple[pa.Table, set]:
  """features.merge_engaged_queries and features.uncertain_merge_keys for every key at once:
  `current` the stored lists (key, query, count), `new` one window's counts. Returns the merged
  lists (keys without a new count unchanged) and the keys whose merge is not certified exact.
  A stored list that is full (`top` queries, m its smallest count) is uncertain when a new
  query q outside it could, with its largest possible old count, rank at or before the merged
  k-th entry (c_k, q_k): m + c(q) > c_k, or m + c(q) == c_k and q <= q_k."""
  touched = key_codes(current, new.group_by(KEY, use_threads=False).aggregate([])) >= 0
  stored, kept = current.filter(pa.array(touched)), current.filter(pa.array(~touched))
  both = pa.concat_tables([stored, new.select(current.column_names)])
  merged, last = ranked(both.group_by(KEY + ["query"], use_threads=False).aggregate(
      [("count", "sum")]).rename_columns({"count_sum": "count"}), top)
  unsure: set = set()
  if stored.num_rows:
    lists = stored.group_by(KEY, use_threads=False).aggregate([([], "count_all"),
                                                               ("count", "min")])
    full = lists.filter(pc.equal(lists["count_all"], top))
    kth = merged.filter(pa.array(last))
    # the new queries outside the stored lists, of keys whose stored list is full
    outside = new.join(stored.select(KEY + ["query"]).append_column(
        "stored", pa.array(np.ones(stored.num_rows, bool))), KEY + ["query"],
        use_threads=False)
    outside = outside.filter(pc.is_null(outside["stored"]))
    f = key_codes(outside, full)
    outside, f = outside.filter(pa.array(f >= 0)), f[f >= 0]
    k = key_codes(outside, kth)
    best = full["count_min"].to_numpy()[f] + outside["count"].to_numpy()
    c_k = kth["count"].to_numpy()[k]
    q = outside["query"].to_numpy(zero_copy_only=False)
    q_k = kth["query"].to_numpy(zero_copy_only=False)[k]
    hit = (best > c_k) | ((best == c_k) & (q <= q_k))
    unsure = set(zip(outside["entity"].to_numpy()[hit].tolist(),
                     outside["engagement"].to_numpy()[hit].tolist()))
  return pa.concat_tables([kept, merged.select(current.column_names)]), unsure


def engaged_lists(t: pa.Table, top: int) -> tuple[pa.Table, set]:
  """The engaged-query refresh of SPEC (features.merge_engaged_queries) over (entity,
  engagement, window, query, count) rows of one kind holding every row of their keys: window by
  window in order, each merged into the stored lists (one window when refresh_days is 0: a full
  recompute). Returns the lists as ranked (key, query, count) rows and the uncertain keys."""
  t = t.group_by(KEY + ["window", "query"], use_threads=False).aggregate([("count", "sum")])
  t = t.rename_columns({"count_sum": "count"})
  current = pa.table(dict(entity=pa.array([], pa.int64()), engagement=pa.array([], pa.int64()),
                          query=pa.array([], pa.string()), count=pa.array([], pa.int64())))
  window, unsure = t["window"].to_numpy(), set()
  for w in np.unique(window):
    current, uncertain = merge_window(current, t.filter(pa.array(window == w)), top)
    unsure |= uncertain
  return ranked(current, top)[0], unsure


def engaged_block(t: pa.Table, top: int) -> pa.Table:
  """The engaged-query lists (ENGAGED_LISTS rows) of every (kind, entity, engagement) key of a
  block holding all the rows of its keys (engaged_lists per kind)."""
  parts = []
  for kind in pc.unique(t["kind"]).to_pylist():
    lists, unsure = engaged_lists(t.filter(pc.equal(t["kind"], kind)), top)
    e, g = lists["entity"].to_numpy(), lists["engagement"].to_numpy()
    if not len(e):
      continue
    starts = np.flatnonzero(np.r_[True, (e[1:] != e[:-1]) | (g[1:] != g[:-1])])
    offsets = pa.array(np.r_[starts, len(e)].astype(np.int32))
    keys = list(zip(e[starts].tolist(), g[starts].tolist()))
    parts.append(pa.table([
        pa.array([kind] * len(keys), pa.string()), pa.array(e[starts]), pa.array(g[starts]),
        pa.ListArray.from_arrays(offsets, lists["query"].combine_chunks()),
        pa.ListArray.from_arrays(offsets, lists["count"].combine_chunks()),
        pa.array([k in unsure for k in keys], pa.bool_())], schema=ENGAGED_LISTS))
  return pa.concat_tables(parts) if parts else ENGAGED_LISTS.empty_table()


def engaged_queries(log: ray.data.Dataset, top: int, refresh_days: int, directory: str) -> dict:
  """{kind: path}: the engaged-query lists (ENGAGED_LISTS rows) of the pins and of the products,
  each file sorted by entity, from the train rows engaging them, with the refresh of
  features.merge_engaged_queries: per block a count by (kind, entity, engagement, window, query)
  (window = the refresh window of the row; 0 for all when refresh_days is 0), the counts
  co-located by (kind, entity, engagement), then every key's windows merged in one engaged_block
  call per block. top 0 (the feature off, as for Home Depot): empty files, and no stage runs."""
  paths = {kind: os.path.join(directory, f"engaged_{kind}.parquet")
           for kind in ("pins", "products")}
  if top <= 0:
    for path in paths.values():
      pq.write_table(ENGAGED_LISTS.empty_table(), path)
    return paths

  def counts(t: pa.Table) -> pa.Table:
    t = t.filter(pc.and_(pc.equal(t["split"], 0), pc.is_in(t["kind"], pa.array(
        ["pins", "products"]))))
    ts = t["timestamp"].to_numpy()
    t = t.select(["kind", "entity", "engagement", "query"]).append_column(
        "window", pa.array(ts // (refresh_days * DAY) if refresh_days else np.zeros_like(ts)))
    return t.group_by(["kind"] + KEY + ["window", "query"], use_threads=False).aggregate(
        [([], "count_all")]).rename_columns({"count_all": "count"})

  lists = map_key_blocks(log.map_batches(counts, **WHOLE_BLOCKS), ["kind"] + KEY,
                         engaged_block, top=top).materialize()
  for kind, path in paths.items():
    write_table_file(lists.map_batches(lambda t, k=kind: t.filter(pc.equal(t["kind"], k)),
                                       **WHOLE_BLOCKS), path, ENGAGED_LISTS.empty_table(),
                     key="entity")
  return paths


@dataclasses.dataclass
class FeatureLists:
  """The board titles and engaged-query lists on disk, sorted by entity: `for_block` reads the
  lists of one block's entities only (a join on entity_index), so neither the driver nor a
  worker holds them all."""
  boards: str     # BOARD_TITLES rows, sorted by pin
  engaged: dict   # {kind: ENGAGED_LISTS rows of that kind, sorted by entity}

  def for_block(self, kind: str, index: np.ndarray) -> tuple[dict, dict]:
    """({position: titles}, {(position, engagement): [(query, count)]}) of the entities
    `index` (entity_index values; position = their place in `index`)."""
    index = np.asarray(index, np.int64)
    if not len(index):
      return {}, {}
    lo, hi = int(index.min()), int(index.max())
    position = {e: i for i, e in enumerate(index.tolist())}
    boards: dict = {}
    if kind == "pins":
      t = pq.read_table(self.boards, filters=[("pin", ">=", lo), ("pin", "<=", hi)])
      boards = {position[p]: titles for p, titles in zip(t["pin"].to_pylist(),
                                                         t["titles"].to_pylist())
                if p in position}
    t = pq.read_table(self.engaged[kind], filters=[("entity", ">=", lo), ("entity", "<=", hi)])
    columns = (t[c].to_pylist() for c in ("entity", "engagement", "queries", "counts"))
    engaged = {(position[e], g): list(zip(q, c)) for e, g, q, c in zip(*columns)
               if e in position}
    return boards, engaged

  def summary(self) -> dict:
    """prepare's meta.json "features" counts, from the key columns alone."""
    out = dict(pins_with_board_titles=pq.read_metadata(self.boards).num_rows,
               engaged_lists_not_certified_exact={}, entities_with_engaged_queries={})
    for kind, path in self.engaged.items():
      t = pq.read_table(path, columns=["entity", "uncertain"])
      out["engaged_lists_not_certified_exact"][kind] = int(pc.sum(t["uncertain"]).as_py() or 0)
      out["entities_with_engaged_queries"][kind] = len(pc.unique(t["entity"]))
    return out

  def as_dicts(self) -> tuple[dict, dict, dict]:
    """(boards {pin: titles}, engaged {kind: {(entity, engagement): [(query, count)]}},
    uncertain {kind: keys}): every list in memory, for small worlds and their tests."""
    t = pq.read_table(self.boards)
    boards = dict(zip(t["pin"].to_pylist(), t["titles"].to_pylist()))
    engaged, uncertain = {}, {}
    for kind, path in self.engaged.items():
      t = pq.read_table(path)
      columns = [t[c].to_pylist() for c in ENGAGED_LISTS.names[1:]]
      engaged[kind] = {(e, g): list(zip(q, c)) for e, g, q, c, _ in zip(*columns)}
      uncertain[kind] = {(e, g) for e, g, _, _, u in zip(*columns) if u}
    return boards, engaged, uncertain


def feature_lists(logs, d, directory: str) -> FeatureLists:
  """Step 3: the board titles and engaged queries of the train window, written to `directory`."""
  os.makedirs(directory, exist_ok=True)
  return FeatureLists(board_titles(logs.saves, d.board_titles_top,
                                   os.path.join(directory, "board_titles.parquet")),
                      engaged_queries(logs.log, d.engaged_queries_top, d.engaged_refresh_days,
                                      directory))


# --- 4. n-gram vocabularies as an aggregation ----------------------------------------------------
def block_items(t: pa.Table, kind: str, lists: FeatureLists) -> list:
  """field_items of the entities of one block, with the feature lists of its entities."""
  ent = {"ids": t["id"].to_numpy(zero_copy_only=False),
         **{f: t[f].to_numpy(zero_copy_only=False) for f in TEXT_FIELDS}}
  return field_items(ent, *lists.for_block(kind, t["entity_index"].to_numpy()))


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


def top_ngrams(t: pa.Table, sizes: dict) -> pa.Table:
  """The first sizes[vocab] rows of each vocabulary in NgramVocab's order (count descending,
  then token: Arrow orders strings by their UTF-8 bytes, which is Python's code-point order)."""
  t = t.sort_by([("vocab", "ascending"), ("count", "descending"), ("token", "ascending")])
  vocab = t["vocab"].to_numpy(zero_copy_only=False)
  parts = []
  for v, size in sizes.items():
    rows = np.flatnonzero(vocab == v)
    parts.append(t.slice(int(rows[0]), min(size, len(rows))) if len(rows) else t.slice(0, 0))
  return pa.concat_tables(parts)


def ngram_vocab(datasets: dict, lists: FeatureLists, d) -> text.NgramVocab:
  """NgramVocab.build over every entity field text: per-block counts, summed per (vocab, token)
  (sum_by), each block's top candidates, the global top on the driver."""
  sizes = {"trigram": d.trigram_vocab, "unigram": d.unigram_vocab, "bigram": d.bigram_vocab}

  def counts_of(kind):
    def fn(t: pa.Table) -> pa.Table:
      items = block_items(t, kind, lists)
      return ngram_counts(x for per in items for f in per for x in f)
    return fn

  parts = [ds.map_batches(counts_of(k), **WHOLE_BLOCKS) for k, ds in datasets.items()]
  # Each block of the sums holds whole (vocab, token) keys: its top candidates are cut there.
  summed = sum_by(parts[0].union(*parts[1:]), ["vocab", "token"])
  top = top_ngrams(driver_table(summed.map_batches(top_ngrams, fn_args=(sizes,),
                                                   **WHOLE_BLOCKS),
                                ngram_counts([])), sizes)
  vocab, token = top["vocab"].to_pylist(), top["token"].to_pylist()
  return text.NgramVocab(*[[t for v, t in zip(vocab, token) if v == name]
                           for name in ("trigram", "unigram", "bigram")])


# --- 5. entity tables ----------------------------------------------------------------------------
def encode_block(t: pa.Table, kind: str, lists: FeatureLists, vocab: text.NgramVocab,
                 d) -> pa.Table:
  """The entities/<kind>.parquet rows of one block of valid entities (EntityStage.dataset)."""
  tokens, fields = encode_entities(block_items(t, kind, lists), vocab, d, f"encode {kind}")
  return pa.table(dict(entity_index=t["entity_index"], id=t["id"], tokens=tokens, fields=fields,
                       legacy=t["legacy"], visual=t["visual"], title=t["title"]))


def encode_entity_tables(datasets: dict, lists: FeatureLists, vocab: text.NgramVocab,
                         d) -> dict:
  """{kind: dataset of the entities/<kind>.parquet columns}: encode_block per block."""
  ref = ray.put(vocab)

  def encoder(kind):
    def fn(t: pa.Table) -> pa.Table:
      return encode_block(t, kind, lists, ray.get(ref), d)
    return fn

  return {k: ds.map_batches(encoder(k), **WHOLE_BLOCKS) for k, ds in datasets.items()}
