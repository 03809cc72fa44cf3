"""`launch.py prepare` on Ray Data: the stages of prepare.py as streaming Ray Data work.

Not yet the `prepare` of launch.py: every stage here is held to prepare.py's output on the tiny
synthetic world (tests/test_prepare_ray.py, tests/fixtures/prepare_tiny_digest.json) and replaces
it only once the whole prepared directory equals that digest (docs/scale_out.md, "prepare on Ray
Data: status").

Stages (the numbers of prepare.py's docstring):
  1. Validation. A raw table is read one Parquet row group per Ray Data block (`read_row_groups`:
     Ray's read_parquet gives no row numbers, and "the first valid row of an id wins" and the
     dense entity_index both need them). Each block is conformed (raw_tables.conform_raw_table)
     and validated by entity_rows.valid_entities / `log_block` / `saves_block`; it returns its
     valid rows plus one summary row per bad-row reason, and the counts are a group-by sum over
     blocks (`bad_row_counts`). Duplicate ids across blocks: a driver pass over (row, id) of the
     valid rows only (`dedupe_entities`).
  2. Time split: the last day is a max() aggregation; the split code a map_batches.
  3. Board titles and engaged queries (with the incremental merge) are group-bys:
     groupby(pin).map_groups, groupby(kind, entity, engagement).map_groups.
  4. n-gram vocabularies: per-block n-gram counts summed by a groupby(vocab, token).sum().
  5. Entity tables: encode_entities in map_batches, written by write_parquet (a directory of
     files per kind for now, not prepare's single entities/<kind>.parquet). Queries: distinct
     texts by unique(); the WordPiece vocabulary learned on the driver (TensorFlow, as today);
     tokenisation in map_batches by QueryTokens actors (TensorFlow in those workers only).
     Pairs: the caps on the driver over (row, entity) ints in log order with prepare's per-task
     generator, so the kept pairs are exactly prepare's; records built in map_batches and written
     by ArrayRecordSink (a Datasink) after a seeded random_shuffle into num_shards blocks.

Driver-side state so far (ints, ids and distinct texts, not rows): the id -> entity_index maps,
the distinct query texts and their tokens, the board-title / engaged-query lists, the train
queries the WordPiece learner reads, the (row, entity) columns the caps read. These are broadcast
(ray.put) to the blocks that need them; joins would replace them at production scale.
`prepare_on_ray` runs them all and writes prepare's directory (equal to the frozen digest of
the tiny world). Not here yet: judged_negatives, prepare's empty-table errors, launch.py wiring.

Usage (tests/test_prepare_ray.py runs every stage):
  with data_context(SMALL_SHUFFLE):
    entities = validate_entities(config, raw_dir)             # {kind: EntityStage}
    logs = validate_logs(config, raw_dir, entities)           # LogStage: log, saves, split
"""

import collections
import contextlib
import dataclasses
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from omnisage.data import text
from omnisage.data.omnisearchsage import features, schema
from omnisage.data.omnisearchsage.entity_rows import (
  REASONS,
  RowChecks,
  encode_entities,
  field_items,
  normalized_texts,
  valid_entities,
)
from omnisage.data.omnisearchsage.raw_tables import conform_raw_table

DAY = 86_400
TIME_MIN = 946_684_800  # as prepare.TIME_MIN (2000-01-01 UTC)
ALLOWED = {"pins": ("save", "long_click"), "products": ("save", "long_click", "add_to_cart",
           "checkout"), "queries": ("click",)}
SPLITS = {"train": 0, "eval": 2}
TEXT_FIELDS = ("title", "description", "caption")
EXAMPLES = 5   # bad rows kept as examples per table (prepare's `rejected`)


# Ray Data's default shuffle (2.60: SHUFFLE_V2, hash shuffle on aggregator actors) is the one
# for big group-bys, but starting its actors costs seconds per group-by: on the tiny world the
# stages take ~95 s with it and ~9 s with the sort shuffle (2-core VM). Tests pass SMALL_SHUFFLE.
SMALL_SHUFFLE = "sort_shuffle_pull_based"


@contextlib.contextmanager
def data_context(shuffle_strategy: str | None = None, progress_bars: bool = False):
  """Ray Data's DataContext of this driver for the datasets made inside; restored after."""
  from ray.data.context import ShuffleStrategy
  ctx = ray.data.DataContext.get_current()
  saved = (ctx.shuffle_strategy, ctx.enable_progress_bars)
  if shuffle_strategy:
    ctx.shuffle_strategy = ShuffleStrategy(shuffle_strategy)
  ctx.enable_progress_bars = progress_bars
  try:
    yield ctx
  finally:
    ctx.shuffle_strategy, ctx.enable_progress_bars = saved


# --- reading: one block per Parquet row group, with global row numbers ---------------------------
def raw_path(raw_dir: str, name: str) -> str:
  return os.path.join(raw_dir, f"{name}.parquet")


def check_raw_schema(raw_dir: str, name: str) -> int:
  """Step 0 before any value is read: the file exists and its columns conform (an error names
  table, file, column); returns its row count (from the footer)."""
  path = raw_path(raw_dir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: prepare needs the tables "
                            f"{', '.join(schema.RAW_TABLES)}")
  try:
    meta = pq.read_metadata(path)
  except pa.ArrowException as error:
    raise ValueError(f"{name} table {path}: not a readable Parquet file ({error})") from None
  conform_raw_table(meta.schema.to_arrow_schema().empty_table(), name, f"{name} table {path}")
  return meta.num_rows


def read_row_groups(path: str, name: str, fn, **fn_kwargs) -> ray.data.Dataset:
  """`fn(table, start=first global row, **fn_kwargs) -> pa.Table` over every row group of the
  raw table `name`, each its own Ray Data block (read in the task: nothing passes the driver)."""
  meta = pq.read_metadata(path)
  counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
  starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
  units = [{"group": g, "start": int(s)} for g, s in enumerate(starts)]
  where = f"{name} table {path}"

  def read(batch: dict) -> pa.Table:
    parts = []
    for g, s in zip(batch["group"].tolist(), batch["start"].tolist()):
      table = conform_raw_table(pq.ParquetFile(path).read_row_group(g), name, where)
      parts.append(fn(table, start=s, **fn_kwargs))
    return pa.concat_tables(parts, promote_options="default")

  return ray.data.from_items(units, override_num_blocks=max(1, len(units))).map_batches(
      read, batch_size=1, batch_format="numpy")


def summary_rows(good: pa.Table, counts: dict, examples: list, start: int) -> pa.Table:
  """`good` (reason null, count 1) + one row per bad-row reason with its count + the example bad
  rows [(block row, reason)] (count 0, their global row number)."""
  good = good.append_column("reason", pa.nulls(good.num_rows, pa.string()))
  good = good.append_column("count", pa.array(np.ones(good.num_rows, np.int64)))
  bad = pa.table(dict(
      row=pa.array([-1] * len(counts) + [start + i for i, _ in examples], pa.int64()),
      reason=pa.array(list(counts) + [r for _, r in examples], pa.string()),
      count=pa.array(list(counts.values()) + [0] * len(examples), pa.int64())))
  return pa.concat_tables([good, bad], promote_options="default")


def with_bad_rows(good: pa.Table, rows: RowChecks, start: int) -> pa.Table:
  """summary_rows from the RowChecks of a block."""
  examples = [(int(i), REASONS[rows.code[i] - 1]) for i in np.flatnonzero(~rows.good)[:EXAMPLES]]
  return summary_rows(good, rows.counts(), examples, start)


def split_bad_rows(ds: ray.data.Dataset) -> tuple[ray.data.Dataset, dict, dict]:
  """(the valid rows, {reason: count summed over blocks}, {row: reason} of the first examples)."""
  ds = ds.materialize()
  good = ds.map_batches(lambda t: t.filter(pc.is_null(t["reason"])).drop_columns(
      ["reason", "count"]), batch_format="pyarrow")
  bad = ds.map_batches(lambda t: t.filter(pc.is_valid(t["reason"])).select(
      ["row", "reason", "count"]), batch_format="pyarrow").materialize()
  counts = {r["reason"]: int(r["sum(count)"]) for r in bad.groupby("reason").sum("count")
            .take_all() if r["sum(count)"]}
  examples = sorted((r["row"], r["reason"]) for r in bad.map_batches(
      lambda t: t.filter(pc.greater_equal(t["row"], 0)), batch_format="pyarrow").take_all())
  return good, counts, dict(examples[:EXAMPLES])


def ordered(counts: dict) -> dict:
  """Bad-row counts in REASONS order (as RowChecks.counts)."""
  return {r: counts[r] for r in REASONS if counts.get(r)}


# --- 1. entities ---------------------------------------------------------------------------------
def entity_block(table: pa.Table, start: int, kind: str, d) -> pa.Table:
  """valid_entities of one block: its valid rows (global row, id, texts, legacy, visual) and its
  bad rows. Duplicate ids are flagged within the block here, across blocks by dedupe_entities."""
  bad: dict = {}
  ent = valid_entities(table, kind, d, bad)
  # valid_entities reports counts, not per-row codes; its `rejected` are the examples.
  good = pa.table(dict(
      row=pa.array(start + ent["rows"].astype(np.int64)),
      id=pa.array(ent["ids"], pa.string()),
      **{f: pa.array(ent[f] if f in ent else [None] * len(ent["ids"]), pa.string())
         for f in TEXT_FIELDS},
      legacy=ent["legacy"], visual=ent["visual"]))
  return summary_rows(good, bad[kind], sorted(ent["rejected"].items()), start)


@dataclasses.dataclass
class EntityStage:
  """The valid entities of one kind, in input order: entity_index = position."""
  dataset: ray.data.Dataset      # entity_index, id, title, description, caption, legacy, visual
  index: dict                    # raw id -> entity_index
  bad: dict                      # reason -> count (summed over blocks)
  examples: dict                 # global row -> reason, the first EXAMPLES bad rows
  raw_rows: int


def dedupe_entities(good: ray.data.Dataset) -> tuple[np.ndarray, dict, list]:
  """(sorted rows kept, id -> entity_index, rows dropped as duplicate_id): the first valid row of
  an id wins, over all blocks. A driver pass over (row, id) only."""
  pairs = good.select_columns(["row", "id"]).to_arrow_refs()
  table = pa.concat_tables(ray.get(pairs)) if pairs else pa.table(dict(row=[], id=[]))
  order = np.argsort(table["row"].to_numpy(), kind="stable")
  rows = table["row"].to_numpy()[order]
  ids = table["id"].to_numpy(zero_copy_only=False)[order]
  index: dict = {}
  kept, dropped = [], []
  for r, i in zip(rows.tolist(), ids.tolist()):
    if i not in index:
      index[i] = len(kept)
      kept.append(r)
    else:
      dropped.append(r)
  return np.asarray(kept, np.int64), index, dropped


def validate_entities(config, raw_dir: str) -> dict:
  """{"pins": EntityStage, "products": EntityStage}: prepare's step 1 for the entity tables."""
  out = {}
  for kind in ("pins", "products"):
    n = check_raw_schema(raw_dir, kind)
    ds = read_row_groups(raw_path(raw_dir, kind), kind, entity_block, kind=kind, d=config.data)
    good, bad, examples = split_bad_rows(ds)
    kept, index, dups = dedupe_entities(good)
    if dups:
      bad["duplicate_id"] = bad.get("duplicate_id", 0) + len(dups)
      examples = dict(sorted({**examples, **dict.fromkeys(dups, "duplicate_id")}.items())
                      [:EXAMPLES])

    def number(t: pa.Table, kept=kept) -> pa.Table:
      rows = t["row"].to_numpy()
      pos = np.searchsorted(kept, rows)
      mine = (pos < len(kept)) & (kept[np.minimum(pos, len(kept) - 1)] == rows)
      t = t.filter(pa.array(mine)).drop_columns(["row"])
      return t.add_column(0, "entity_index", pa.array(pos[mine].astype(np.int32)))

    out[kind] = EntityStage(good.map_batches(number, batch_format="pyarrow").materialize(),
                            index, ordered(bad), examples, n)
  return out


# --- 1. logs and board saves ---------------------------------------------------------------------
def member(values: np.ndarray, known) -> np.ndarray:
  return np.fromiter((v in known for v in values), bool, len(values))


def timestamps(col, rows: RowChecks, lo: int, hi: int) -> np.ndarray:
  """As prepare's: int64 seconds (0 where null); flags null, negative, out-of-range rows."""
  null = col.is_null().to_numpy(zero_copy_only=False)
  ts = col.fill_null(0).to_numpy().astype(np.int64)
  rows.flag(null, "missing_field")
  rows.flag(~null & (ts < 0), "negative_timestamp")
  rows.flag(~null & ((ts < lo) | (ts > hi)), "timestamp_out_of_range")
  return ts


def log_block(table: pa.Table, start: int, entity_ids: dict, d, time_range) -> pa.Table:
  """prepare's log validation on one block (the block-level version of prepare._log)."""
  rows = RowChecks(table.num_rows)
  query = normalized_texts(table["query"], rows, d.max_text_chars, required=True)
  target = normalized_texts(table["entity_id"], rows, d.max_text_chars, required=True)
  kind = table["entity_kind"].to_numpy(zero_copy_only=False)
  eng = table["engagement"].to_numpy(zero_copy_only=False)
  ts = timestamps(table["timestamp"], rows, *time_range)
  rows.flag((kind == None) | (eng == None), "missing_field")  # noqa: E711
  allowed = {(k, e) for k, es in ALLOWED.items() for e in es}
  rows.flag(np.fromiter(((k, e) not in allowed for k, e in zip(kind, eng)), bool, len(kind)),
            "invalid_value")
  has_split = "split" in table.column_names
  if has_split:
    split = table["split"].to_numpy(zero_copy_only=False)
    rows.flag(np.fromiter((s not in SPLITS for s in split), bool, len(split)), "invalid_value")
  raw_ids = table["entity_id"].to_numpy(zero_copy_only=False)
  for k in ("pins", "products"):
    sel = (kind == k) & rows.good
    rows.flag(sel & ~member(raw_ids, entity_ids[k]), "unknown_entity")
  keep = rows.good
  good = dict(
      row=pa.array(start + np.flatnonzero(keep).astype(np.int64)),
      query=pa.array(query[keep], pa.string()), target=pa.array(target[keep], pa.string()),
      kind=pa.array(kind[keep], pa.string()),
      entity=pa.array(np.array([entity_ids[k][r] if k != "queries" else -1
                                for k, r in zip(kind[keep], raw_ids[keep])], np.int64)),
      engagement=pa.array(np.array([schema.ENGAGEMENT_INDEX[e] for e in eng[keep]], np.int64)),
      timestamp=pa.array(ts[keep]))
  if has_split:
    good["split"] = pa.array(np.array([SPLITS[s] for s in split[keep]], np.int64))
  return with_bad_rows(pa.table(good), rows, start)


def saves_block(table: pa.Table, start: int, pin_ids: dict, d, time_range) -> pa.Table:
  """prepare's board-save validation on one block (prepare._saves)."""
  rows = RowChecks(table.num_rows)
  title = normalized_texts(table["board_title"], rows, d.max_text_chars, required=True)
  pins = table["pin_id"].to_numpy(zero_copy_only=False)
  ts = timestamps(table["timestamp"], rows, *time_range)
  rows.flag(pins == None, "missing_field")  # noqa: E711
  rows.flag(~member(pins, pin_ids), "unknown_entity")
  keep = rows.good
  good = pa.table(dict(
      row=pa.array(start + np.flatnonzero(keep).astype(np.int64)),
      pin=pa.array(np.array([pin_ids[p] for p in pins[keep]], np.int64)),
      title=pa.array(title[keep], pa.string()), timestamp=pa.array(ts[keep])))
  return with_bad_rows(good, rows, start)


@dataclasses.dataclass
class LogStage:
  """Valid log rows with their split code, valid board saves, and the split's bounds."""
  log: ray.data.Dataset    # row, query, target, kind, entity, engagement, timestamp, split
  saves: ray.data.Dataset  # row, pin, title, timestamp, in_train
  bad: dict                # {"queries_log": {...}, "board_saves": {...}}
  split: dict              # prepare's meta.json "split"
  raw_rows: dict


def time_split(log: ray.data.Dataset, d, explicit: bool) -> tuple[ray.data.Dataset, dict]:
  """Step 2: split code 0 train / 1 gap / 2 eval (the last eval_days whole UTC days, gap_days
  before them), or the explicit `split` column; returns the log with `split` and the bounds."""
  last_day = int(log.max("timestamp")) // DAY
  eval_start = (last_day - d.eval_days + 1) * DAY
  train_end = eval_start - d.gap_days * DAY
  if explicit:
    train_end = eval_start = None
  else:
    def code(t: pa.Table) -> pa.Table:
      ts = t["timestamp"].to_numpy()
      return t.append_column("split", pa.array(
          np.where(ts >= eval_start, 2, np.where(ts < train_end, 0, 1)).astype(np.int64)))
    log = log.map_batches(code, batch_format="pyarrow")
  log = log.materialize()
  counts = {r["split"]: r["count()"] for r in log.groupby("split").count().take_all()}
  bounds = dict(kind="column" if explicit else "time", train_end=train_end,
                eval_start=eval_start, eval_end=None if explicit else (last_day + 1) * DAY,
                log_rows=dict(train=int(counts.get(0, 0)), gap=int(counts.get(1, 0)),
                              eval=int(counts.get(2, 0))))
  return log, bounds


def validate_logs(config, raw_dir: str, entities: dict) -> LogStage:
  """Steps 1 (logs, board saves) and 2 (the time split)."""
  d = config.data
  raw_rows = {name: check_raw_schema(raw_dir, name) for name in ("queries_log", "board_saves")}
  explicit = "split" in pq.read_schema(raw_path(raw_dir, "queries_log")).names
  time_range = (0 if explicit else TIME_MIN, int(time.time()) + DAY)
  ids = ray.put({k: e.index for k, e in entities.items()})

  def log_fn(table, start):
    return log_block(table, start, ray.get(ids), d, time_range)

  def saves_fn(table, start):
    return saves_block(table, start, ray.get(ids)["pins"], d, time_range)

  log, log_bad, _ = split_bad_rows(read_row_groups(raw_path(raw_dir, "queries_log"),
                                                   "queries_log", log_fn))
  saves, saves_bad, _ = split_bad_rows(read_row_groups(raw_path(raw_dir, "board_saves"),
                                                       "board_saves", saves_fn))
  log, split = time_split(log, d, explicit)
  train_end = split["train_end"]

  def in_train(t: pa.Table) -> pa.Table:
    ts = t["timestamp"].to_numpy()
    return t.append_column("in_train", pa.array(
        ts < train_end if train_end is not None else np.ones(len(ts), bool)))

  saves = saves.map_batches(in_train, batch_format="pyarrow").materialize()
  split["board_saves_train"] = int(saves.sum("in_train") or 0) if saves.count() else 0
  return LogStage(log, saves, {"queries_log": ordered(log_bad), "board_saves": ordered(saves_bad)},
                  split, raw_rows)


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
ENTITY_COLUMNS = ("entity_index", "id", "tokens", "fields", "legacy", "visual", "title")


def encode_entity_tables(datasets: dict, boards: dict, engaged: dict, vocab: text.NgramVocab,
                         d) -> dict:
  """{kind: dataset of the entities/<kind>.parquet columns}: encode_entities per block."""
  refs = ray.put((boards, engaged, vocab))

  def encoder(kind):
    def fn(t: pa.Table) -> pa.Table:
      b, e, v = ray.get(refs)
      tokens, fields = encode_entities(block_items(t, b if kind == "pins" else {}, e[kind]), v,
                                       d, f"encode {kind}")
      return pa.table(dict(entity_index=t["entity_index"], id=t["id"], tokens=tokens,
                           fields=fields, legacy=t["legacy"], visual=t["visual"],
                           title=t["title"]))
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


# --- queries: distinct texts, WordPiece in map_batches, the queries table ------------------------
def query_texts(log: ray.data.Dataset) -> list[str]:
  """Every distinct normalised query of the logs, both sides of query->query, sorted: a
  unique() aggregation (the list is the queries table, so the driver holds it)."""
  def texts(t: pa.Table) -> pa.Table:
    targets = t.filter(pc.equal(t["kind"], "queries"))["target"]
    return pa.table(dict(text=pa.concat_arrays([t["query"].combine_chunks(),
                                                targets.combine_chunks()])))
  return sorted(log.map_batches(texts, batch_format="pyarrow").unique("text"))


def train_queries(log: ray.data.Dataset) -> list[str]:
  """The WordPiece learner's input, as prepare's: train queries in log order, then the train
  query->query targets in log order (the learner runs on the driver, in TensorFlow)."""
  refs = log.map_batches(lambda t: t.filter(pc.equal(t["split"], 0)).select(
      ["row", "query", "target", "kind"]), batch_format="pyarrow").to_arrow_refs()
  table = pa.concat_tables(ray.get(refs))
  table = table.take(pc.sort_indices(table["row"]))
  return (table["query"].to_pylist()
          + table.filter(pc.equal(table["kind"], "queries"))["target"].to_pylist())


class QueryTokens:
  """map_batches UDF: WordPiece tokens and n-gram (lexical) ids of query texts. TensorFlow is
  imported in the Ray worker that runs it, never in the driver's training code."""

  def __init__(self, vocab_path: str, lower_case: bool, max_len: int, ngram_ref):
    from omnisage.data import wordpiece
    self.tokenizer = wordpiece.QueryTokenizer(vocab_path, lower_case, max_len)
    self.ngrams = ray.get(ngram_ref[0])   # in a list: Ray passes it as a ref, not a value

  def __call__(self, t: pa.Table) -> pa.Table:
    texts = t["text"].to_pylist()
    return pa.table(dict(entity_index=t["entity_index"], text=t["text"],
                         tokens=int32_lists(self.tokenizer.tokenize(texts)),
                         lexical=int32_lists([self.ngrams.encode(q) for q in texts])))


def int32_lists(rows) -> pa.Array:
  offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32)
  values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
  return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def query_vocab(config, log: ray.data.Dataset, out_dir: str) -> str:
  """<out_dir>/query_vocab.txt: copied from data.query_vocab_file, or learned from the train
  queries (driver-side TensorFlow, as prepare's)."""
  import shutil
  d = config.data
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "query_vocab.txt")
  if d.query_vocab_file:
    shutil.copyfile(d.query_vocab_file, path)
  else:
    from omnisage.data import wordpiece
    wordpiece.write_vocab(wordpiece.learn_vocab(train_queries(log), d.query_vocab_size,
                                                d.query_lower_case), path)
  return path


def query_table(texts: list[str], vocab_path: str, ngrams: text.NgramVocab, d,
                workers: int = 1, batch_size: int = 4096) -> ray.data.Dataset:
  """The entities/queries.parquet columns: tokenisation by `workers` QueryTokens actors."""
  ds = ray.data.from_arrow(pa.table(dict(
      entity_index=pa.array(np.arange(len(texts), dtype=np.int32)),
      text=pa.array(texts, pa.string()))))
  return ds.map_batches(QueryTokens, fn_constructor_args=(
      vocab_path, d.query_lower_case, d.query_max_len, [ray.put(ngrams)]),
      batch_size=batch_size, batch_format="pyarrow", concurrency=workers)


# --- pairs: caps and the ArrayRecord datasink ----------------------------------------------------
class ArrayRecordSink(ray.data.Datasink):
  """Writes each input block of a dataset repartitioned into `num_shards` blocks as one shard
  <directory>/shard-i-of-n.array_record (schema.encode_pair records in column `record`); shards
  no block reached (fewer records than shards) are written empty, as prepare's are."""

  def __init__(self, directory: str, num_shards: int):
    self.directory, self.num_shards = directory, num_shards

  def on_write_start(self, schema=None) -> None:
    import shutil
    if os.path.isdir(self.directory):   # stale shards of an earlier run
      shutil.rmtree(self.directory)
    os.makedirs(self.directory)

  def write(self, blocks, ctx) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter
    shard = ctx.task_idx
    if shard >= self.num_shards:
      raise ValueError(f"write task {shard}: expected {self.num_shards} blocks (repartition)")
    writer = ArrayRecordWriter(os.path.join(
        self.directory, schema.shard_name(shard, self.num_shards)), "group_size:1")
    n = 0
    for block in blocks:
      table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
      for record in table["record"].to_pylist():
        writer.write(record)
        n += 1
    writer.close()
    return n

  def on_write_complete(self, write_result) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    for s in range(self.num_shards):
      path = os.path.join(self.directory, schema.shard_name(s, self.num_shards))
      if not os.path.exists(path):
        ArrayRecordWriter(path, "group_size:1").close()


def pair_rows(log: ray.data.Dataset, q_index_ref, task: str) -> ray.data.Dataset:
  """The log rows of one task with query index `qi` and positive `entity` (a query's index for
  q2query), q2query self-clicks marked (`self_click`)."""
  kind = schema.TASK_ENTITY[task]

  def fn(t: pa.Table) -> pa.Table:
    q_index = ray.get(q_index_ref)
    t = t.filter(pc.equal(t["kind"], kind))
    qi = np.array([q_index[q] for q in t["query"].to_pylist()], np.int64)
    entity = t["entity"].to_numpy()
    if kind == "queries":
      entity = np.array([q_index[q] for q in t["target"].to_pylist()], np.int64)
    self_click = qi == entity if kind == "queries" else np.zeros(len(qi), bool)
    return pa.table(dict(row=t["row"], qi=pa.array(qi), entity=pa.array(entity),
                         engagement=t["engagement"], timestamp=t["timestamp"], split=t["split"],
                         self_click=pa.array(self_click)))
  return log.map_batches(fn, batch_format="pyarrow")


def pair_mask(b: pa.Table, split: int):
  """The rows of split code `split` that make pairs (a q2query self-click teaches nothing)."""
  return pc.and_(pc.equal(b["split"], split), pc.invert(b["self_click"]))


def write_pairs(config, log: ray.data.Dataset, q_index: dict, q_tokens: list, out_dir: str
                ) -> tuple[dict, dict]:
  """Step 5's pair shards: ({split: {task: pairs}}, dropped) as prepare's. The caps
  (features.cap_pairs with prepare's per-task generator) run on the driver over the entity
  column of the capped task's train rows in log order (ints only); records are built in
  map_batches and written by ArrayRecordSink after a seeded random_shuffle."""
  d = config.data
  caps = {"q2pin": d.pin_pair_cap, "q2product": d.product_pair_cap, "q2query": None}
  refs = ray.put(q_index), ray.put(q_tokens)
  pairs: dict = {"train": {}, "eval": {}}
  dropped = {"q2query_self_click": 0}
  for t, task in enumerate(schema.TASK_ENTITY):
    rng = np.random.default_rng([config.seed, t])
    rows = pair_rows(log, refs[0], task).materialize()
    if task == "q2query":
      dropped["q2query_self_click"] = int(rows.sum("self_click") or 0) if rows.count() else 0
    for name, code in (("train", 0), ("eval", 2)):
      keep = None
      if name == "train" and caps[task]:
        refs_t = rows.map_batches(lambda b, c=code: b.filter(pair_mask(b, c)).select(
            ["row", "entity"]), batch_format="pyarrow").to_arrow_refs()
        table = pa.concat_tables(ray.get(refs_t))
        table = table.take(pc.sort_indices(table["row"]))
        keep = table["row"].to_numpy()[features.cap_pairs(table["entity"].to_numpy(), caps[task],
                                                           rng)]

      def records(b: pa.Table, code=code, keep=keep, task=task) -> pa.Table:
        tokens = ray.get(refs[1])
        b = b.filter(pair_mask(b, code))
        if keep is not None:
          b = b.filter(pa.array(np.isin(b["row"].to_numpy(), keep)))
        return pa.table(dict(record=pa.array([schema.encode_pair(a, e, g, s, tokens[a])
                                              for a, e, g, s in zip(
            b["qi"].to_pylist(), b["entity"].to_pylist(), b["engagement"].to_pylist(),
            b["timestamp"].to_pylist())], pa.binary())))

      ds = rows.map_batches(records, batch_format="pyarrow").materialize()
      n = ds.count()
      if n:
        ds.random_shuffle(seed=int(rng.integers(2**31))).repartition(d.num_shards).write_datasink(
            ArrayRecordSink(os.path.join(out_dir, name, task), d.num_shards))
      else:
        sink = ArrayRecordSink(os.path.join(out_dir, name, task), d.num_shards)
        sink.on_write_start()
        sink.on_write_complete(None)
      pairs[name][task] = n
  return pairs, dropped


# --- all stages together -------------------------------------------------------------------------
def write_table_file(ds: ray.data.Dataset, path: str) -> int:
  """One Parquet file of `ds` in entity_index order, streamed batch by batch through the driver
  (prepare's single-file layout; a datasink per file is the next step). Returns its rows."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  writer, n = None, 0
  for batch in ds.sort("entity_index").iter_batches(batch_format="pyarrow", batch_size=None):
    if writer is None:
      writer = pq.ParquetWriter(path, batch.schema)
    writer.write_table(batch)
    n += batch.num_rows
  if writer is not None:
    writer.close()
  return n


def prepare_on_ray(config, raw_dir: str, out_dir: str, query_workers: int = 1) -> dict:
  """prepare.prepare's directory from the stages above (no judged_negatives yet: a raw dir that
  has one is refused). Returns the meta.json summary (without `seconds`)."""
  import json
  if os.path.exists(raw_path(raw_dir, "judged_negatives")):
    raise NotImplementedError("ray_prepare: judged_negatives is not ported yet")
  d = config.data
  entities = validate_entities(config, raw_dir)
  logs = validate_logs(config, raw_dir, entities)
  boards = board_titles(logs.saves, d.board_titles_top)
  engaged, uncertain = engaged_queries(logs.log, d.engaged_queries_top, d.engaged_refresh_days)
  datasets = {k: e.dataset for k, e in entities.items()}
  ngrams = ngram_vocab(datasets, boards, engaged, d)
  os.makedirs(out_dir, exist_ok=True)
  ngrams.save(os.path.join(out_dir, "ngram_vocab"))
  tables = encode_entity_tables(datasets, boards, engaged, ngrams, d)
  for kind, ds in tables.items():
    write_table_file(ds, os.path.join(out_dir, "entities", f"{kind}.parquet"))
  texts = query_texts(logs.log)
  vocab_path = query_vocab(config, logs.log, out_dir)
  queries = query_table(texts, vocab_path, ngrams, d, workers=query_workers).materialize()
  write_table_file(queries, os.path.join(out_dir, "entities", "queries.parquet"))
  tokens = pq.read_table(os.path.join(out_dir, "entities", "queries.parquet"),
                         columns=["tokens"])["tokens"].to_pylist()
  pairs, dropped = write_pairs(config, logs.log, {q: i for i, q in enumerate(texts)},
                               [np.asarray(t, np.int32) for t in tokens], out_dir)
  with open(vocab_path, encoding="utf-8") as f:
    query_vocab_size = len(f.read().splitlines())
  summary = dict(
      vocab=dict(query=query_vocab_size, trigram=len(ngrams.trigrams),
                 unigram=len(ngrams.unigrams), bigram=len(ngrams.bigrams), V=ngrams.size),
      query_vocab_source=d.query_vocab_file or "learned",
      entities=dict(pins=len(entities["pins"].index), products=len(entities["products"].index),
                    queries=len(texts)),
      pairs=pairs, dropped_pairs=dropped,
      bad_rows={**{k: e.bad for k, e in entities.items()}, **logs.bad}, judged_negatives={},
      raw_rows={**{k: e.raw_rows for k, e in entities.items()}, **logs.raw_rows},
      split=logs.split,
      features=dict(pins_with_board_titles=len(boards),
                    engaged_refresh_days=d.engaged_refresh_days,
                    engaged_lists_not_certified_exact={k: len(v) for k, v in uncertain.items()},
                    entities_with_engaged_queries={k: len({e for e, _ in engaged[k]})
                                                   for k in engaged}),
      engine="ray", config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary
