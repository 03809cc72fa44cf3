"""`launch.py prepare`: raw Parquet tables -> the prepared directory of schema.py (SPEC §1).

Steps, in order:
  0. Check every raw table before reading a value: its columns and their Arrow types
     (`schema.RAW_TYPES`), UTF-8 in string columns, and rows in the tables the configured tasks
     need. A defect there is a ValueError naming table, file and column (`launch.py`: exit 2).
  1. Validate every raw row. A bad row is dropped AND counted by reason (`REASONS`, first listed
     reason wins when a row has several defects); nothing crashes on bad data and nothing is silent.
     A needed table left with no valid row is an error, not an empty entity table.
  2. Split the logs by time: eval = the last `eval_days` whole UTC days, the `gap_days` before them
     are dropped (SPEC §1 evaluation: a time gap between train and eval), train = all before.
  3. Features from TRAIN-window logs only (no leakage into eval): board titles (top 10 per pin) and
     engaged queries (top 20 per entity and engagement type), SPEC "Features that enrich entities".
     List fields (board titles, engaged queries) are encoded item by item and concatenated, so no
     bigram spans two items; each field is capped at `field_max_tokens`, the entity at
     `max_entity_tokens`.
  4. Vocabularies: WordPiece for queries (learned from train queries unless `data.query_vocab_file`)
     and the trigram/unigram/bigram vocabularies of the entity tower, from entity field texts.
  5. Entity tables (pins, products, queries) and pair shards per task and split (ArrayRecord,
     `schema.encode_pair`), train pairs capped per entity; then meta.json.

TensorFlow is imported lazily (step 4, via `wordpiece`), so importing this module stays light.

Usage:
  summary = prepare(get_config(), "/tmp/raw", "/tmp/prepared")
"""

import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from omnisage.data import text
from omnisage.data.omnisearchsage import features, schema
from omnisage.data.omnisearchsage.entity_rows import (
  RowChecks,
  encode_entities,
  field_items,
  normalized_texts,
  valid_entities,
)
from omnisage.data.omnisearchsage.raw_tables import read_raw_table

DAY = 86_400
# Timestamps (seconds since 1970 UTC) are valid in [TIME_MIN, the start of prepare + 1 day]: below
# zero is `negative_timestamp`, otherwise outside is `timestamp_out_of_range`. A log with an
# explicit `split` column is not split by time (Home Depot has no time and writes 0), so there, and
# for its board saves, the lower bound is 0.
TIME_MIN = 946_684_800  # 2000-01-01 00:00 UTC
ALLOWED = {"pins": ("save", "long_click"), "products": ("save", "long_click", "add_to_cart",
           "checkout"), "queries": ("click",)}
# Values of the optional queries_log column `split` -> split code (0 train, 2 eval; 1 is the time
# gap, which an explicit split does not have).
SPLITS = {"train": 0, "eval": 2}


def _member(values: np.ndarray, known) -> np.ndarray:
  # A set lookup per row: np.isin on object arrays can degrade to comparing every pair.
  return np.fromiter((v in known for v in values), bool, len(values))


def _needed_entities(config) -> dict:
  """Entity table -> the configured task that needs it (pairs per batch > 0; all without tasks)."""
  tasks = config.get("tasks") or {}
  return {schema.TASK_ENTITY[t]: t for t in ("q2pin", "q2product") if tasks.get(t, 1) > 0}


def _timestamps(col, rows: RowChecks, lo: int, hi: int) -> np.ndarray:
  """int64 seconds (0 where null) of a conformed column; flags null, negative, out-of-range rows."""
  null = col.is_null().to_numpy(zero_copy_only=False)
  ts = col.fill_null(0).to_numpy().astype(np.int64)
  rows.flag(null, "missing_field")
  rows.flag(~null & (ts < 0), "negative_timestamp")
  rows.flag(~null & ((ts < lo) | (ts > hi)), "timestamp_out_of_range")
  return ts


def _log(table: pa.Table, entity_ids: dict, d, bad: dict, time_range) -> dict:
  """Valid log rows: normalised query and target, kind, engagement code, timestamp."""
  rows = RowChecks(table.num_rows)
  query = normalized_texts(table["query"], rows, d.max_text_chars, required=True)
  target = normalized_texts(table["entity_id"], rows, d.max_text_chars, required=True)
  kind = table["entity_kind"].to_numpy(zero_copy_only=False)
  eng = table["engagement"].to_numpy(zero_copy_only=False)
  ts = _timestamps(table["timestamp"], rows, *time_range)
  rows.flag((kind == None) | (eng == None), "missing_field")  # noqa: E711
  allowed = {(k, e) for k, es in ALLOWED.items() for e in es}
  rows.flag(np.fromiter(((k, e) not in allowed for k, e in zip(kind, eng)), bool, len(kind)),
            "invalid_value")
  has_split = "split" in table.column_names
  if has_split:  # an explicit split (datasets without time) overrides the time split
    split = table["split"].to_numpy(zero_copy_only=False)
    rows.flag(np.fromiter((s not in SPLITS for s in split), bool, len(split)), "invalid_value")
  raw_ids = table["entity_id"].to_numpy(zero_copy_only=False)
  for k in ("pins", "products"):
    sel = (kind == k) & rows.good
    rows.flag(sel & ~_member(raw_ids, entity_ids[k]), "unknown_entity")
  bad["queries_log"] = rows.counts()
  keep = rows.good
  eidx = np.array([entity_ids[k][r] if k != "queries" else -1
                   for k, r in zip(kind[keep], raw_ids[keep])], np.int64)
  out = dict(query=query[keep], target=target[keep], kind=kind[keep], entity=eidx,
             engagement=np.array([schema.ENGAGEMENT_INDEX[e] for e in eng[keep]], np.int64),
             timestamp=ts[keep])
  if has_split:
    out["split"] = np.array([SPLITS[s] for s in split[keep]], np.int64)
  return out


def _saves(table: pa.Table, pin_ids: dict, d, bad: dict, time_range) -> dict:
  rows = RowChecks(table.num_rows)
  title = normalized_texts(table["board_title"], rows, d.max_text_chars, required=True)
  pins = table["pin_id"].to_numpy(zero_copy_only=False)
  ts = _timestamps(table["timestamp"], rows, *time_range)
  rows.flag(pins == None, "missing_field")  # noqa: E711
  rows.flag(~_member(pins, pin_ids), "unknown_entity")
  bad["board_saves"] = rows.counts()
  keep = rows.good
  return dict(pin=np.array([pin_ids[p] for p in pins[keep]], np.int64), title=title[keep],
              timestamp=ts[keep])


def _int32_lists(rows) -> pa.Array:
  offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32)
  values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
  return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def _write_shards(records: list[bytes], directory: str, num_shards: int, rng) -> None:
  if os.path.isdir(directory):  # stale shards of an earlier run (maybe another shard count)
    shutil.rmtree(directory)
  os.makedirs(directory)
  order = rng.permutation(len(records))  # shuffled before sharding: shards are exchangeable
  for s, part in enumerate(np.array_split(order, num_shards)):
    writer = ArrayRecordWriter(os.path.join(directory, schema.shard_name(s, num_shards)),
                               "group_size:1")
    for i in part:
      writer.write(records[i])
    writer.close()


def _engaged_queries(log: dict, sel: np.ndarray, top: int, refresh_days: int):
  """Top engaged queries per (entity, engagement) over the rows `sel` of the log.

  refresh_days == 0: one full recompute. Otherwise the production refresh (SPEC): the logs are cut
  into windows of `refresh_days` days and each window is merged into the stored top lists
  (`features.merge_engaged_queries`); lists whose merge is not certified equal to a full recompute
  are returned (`features.uncertain_merge_keys`) and their count is reported, not hidden.
  """
  def counts(rows):
    return features.count_engaged_queries(
        zip(log["entity"][rows].tolist(), log["engagement"][rows].tolist()),
        log["query"][rows].tolist())
  if not refresh_days:
    return features.top_engaged_queries(counts(sel), top), set()
  window = log["timestamp"] // (refresh_days * DAY)
  current, uncertain = {}, set()
  for w in np.unique(window[sel]):
    new = counts(sel & (window == w))
    uncertain |= features.uncertain_merge_keys(current, new, top)
    current = features.merge_engaged_queries(current, new, top)
  return current, uncertain


def _judged_negatives(raw_dir: str, d, index: dict, q_index: dict, train_queries: set,
                      out_dir: str, bad: dict) -> dict:
  """The optional judged_negatives table -> <out>/hard_negatives/<task>.judged.parquet.

  A row is kept when its (normalised) query is a TRAINING query of the log and its entity exists;
  other rows are bad rows counted by reason (unknown_query: the query has no training pair, so
  the negative could never be used; unknown_entity). Returns {task: rows written}."""
  from omnisage.data.omnisearchsage.hard_negatives import table_dir, write_table
  directory = table_dir(out_dir)
  for stale in ("q2pin.judged.parquet", "q2product.judged.parquet"):
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  if not os.path.exists(os.path.join(raw_dir, "judged_negatives.parquet")):
    return {}
  table = read_raw_table(raw_dir, "judged_negatives")
  rows = RowChecks(table.num_rows)
  query = normalized_texts(table["query"], rows, d.max_text_chars, required=True)
  kind = table["entity_kind"].to_numpy(zero_copy_only=False)
  ids = table["entity_id"].to_numpy(zero_copy_only=False)
  rows.flag((kind == None) | (ids == None), "missing_field")  # noqa: E711
  rows.flag(np.fromiter((k not in ("pins", "products") for k in kind), bool, len(kind)),
            "invalid_value")
  known_query = np.fromiter((q_index.get(q, -1) in train_queries for q in query), bool, len(query))
  rows.flag(rows.good & ~known_query, "unknown_query")
  for k in ("pins", "products"):
    rows.flag((kind == k) & rows.good & ~_member(ids, index[k]), "unknown_entity")
  bad["judged_negatives"] = rows.counts()
  keep = rows.good
  written = {}
  for k, task in (("pins", "q2pin"), ("products", "q2product")):
    sel = keep & (kind == k)
    if sel.any():
      written[task] = write_table(
          os.path.join(directory, f"{task}.judged.parquet"),
          [q_index[q] for q in query[sel]], [index[k][i] for i in ids[sel]], "judged")
  return written


def prepare(config, raw_dir: str, out_dir: str) -> dict:
  """Builds `out_dir` from the raw tables in `raw_dir`; returns the summary also in meta.json."""
  d, clock, seconds = config.data, time.perf_counter(), {}
  raw = {name: read_raw_table(raw_dir, name) for name in schema.RAW_TABLES}
  where = {name: f"{name} table {os.path.join(raw_dir, name + '.parquet')}" for name in raw}
  needed = _needed_entities(config)
  why = {"queries_log": "prepare makes every pair from it",
         **{k: f"task {t} needs {k} (config.tasks.{t} > 0; set it to 0 for a world without {k})"
            for k, t in needed.items()}}
  for name, reason in why.items():
    if not raw[name].num_rows:
      raise ValueError(f"{where[name]} is empty (0 rows), but {reason}")
  # An explicit split replaces the time split: timestamps need not be dates there (see TIME_MIN).
  time_range = (0 if "split" in raw["queries_log"].column_names else TIME_MIN,
                int(time.time()) + DAY)
  bad: dict = {}
  ents = {k: valid_entities(raw[k], k, d, bad) for k in ("pins", "products")}
  for k in needed:
    if not len(ents[k]["ids"]):
      raise ValueError(f"{where[k]} has no valid row (all {raw[k].num_rows} bad: {bad[k]}), "
                       f"but {why[k]}")
  index = {k: {i: n for n, i in enumerate(e["ids"])} for k, e in ents.items()}
  log = _log(raw["queries_log"], index, d, bad, time_range)
  if not len(log["timestamp"]):
    raise ValueError(f"{where['queries_log']} has no valid row (all {raw['queries_log'].num_rows} "
                     f"bad: {bad['queries_log']})")
  saves = _saves(raw["board_saves"], index["pins"], d, bad, time_range)
  seconds["validate"] = time.perf_counter() - clock

  # --- time split (whole UTC days) ---
  last_day = int(log["timestamp"].max()) // DAY
  eval_start = (last_day - d.eval_days + 1) * DAY
  train_end = eval_start - d.gap_days * DAY
  if "split" in log:  # explicit split: the time bounds do not apply
    split, train_end, eval_start = log["split"], None, None
  else:
    split = np.where(log["timestamp"] >= eval_start, 2,
                     np.where(log["timestamp"] < train_end, 0, 1))
  train = split == 0
  for k, t in needed.items():  # else train finds no pairs to batch for task t
    if not (train & (log["kind"] == k)).any():
      raise ValueError(f"{where['queries_log']} has no valid training row engaging {k}, but "
                       f"{why[k]} (bad rows: {bad['queries_log']})")

  # --- queries: every distinct normalised query of the logs, both sides of query->query ---
  is_q = log["kind"] == "queries"
  q_texts = sorted(set(log["query"].tolist()) | set(log["target"][is_q].tolist()))
  q_index = {q: i for i, q in enumerate(q_texts)}
  qi = np.array([q_index[q] for q in log["query"]], np.int64)
  log["entity"][is_q] = [q_index[q] for q in log["target"][is_q]]

  from omnisage.data import wordpiece  # the only TensorFlow user, imported only here
  os.makedirs(out_dir, exist_ok=True)
  vocab_path = os.path.join(out_dir, "query_vocab.txt")
  if d.query_vocab_file:
    shutil.copyfile(d.query_vocab_file, vocab_path)
  else:
    train_q = log["query"][train].tolist() + log["target"][train & is_q].tolist()
    wordpiece.write_vocab(wordpiece.learn_vocab(train_q, d.query_vocab_size, d.query_lower_case),
                          vocab_path)
  tokenizer = wordpiece.QueryTokenizer(vocab_path, d.query_lower_case, d.query_max_len)
  q_tokens = tokenizer.tokenize(q_texts)
  seconds["query_vocab"] = time.perf_counter() - clock - sum(seconds.values())

  # --- features from the train window only ---
  # With an explicit split board saves have no train window to respect: all are history.
  in_train = (saves["timestamp"] < train_end if train_end is not None
              else np.ones(len(saves["timestamp"]), bool))
  boards = features.board_titles_per_pin(saves["pin"][in_train], saves["title"][in_train].tolist(),
                                         d.board_titles_top)
  engaged, uncertain = {}, {}
  for k in ("pins", "products"):
    engaged[k], uncertain[k] = _engaged_queries(log, train & (log["kind"] == k),
                                                d.engaged_queries_top, d.engaged_refresh_days)
  items = {k: field_items(ents[k], boards if k == "pins" else {}, engaged[k]) for k in ents}
  vocab = text.NgramVocab.build((t for k in items for per in items[k] for f in per for t in f),
                                d.trigram_vocab, d.unigram_vocab, d.bigram_vocab)
  vocab.save(os.path.join(out_dir, "ngram_vocab"))
  seconds["features"] = time.perf_counter() - clock - sum(seconds.values())

  # --- entity tables ---
  os.makedirs(os.path.join(out_dir, "entities"), exist_ok=True)
  for k, e in ents.items():
    tokens, fields = encode_entities(items[k], vocab, d, f"encode {k}")
    pq.write_table(pa.table(dict(
        entity_index=pa.array(np.arange(len(e["ids"]), dtype=np.int32)),
        id=pa.array(e["ids"], pa.string()), tokens=tokens, fields=fields,
        legacy=e["legacy"], visual=e["visual"], title=pa.array(e["title"], pa.string()))),
        os.path.join(out_dir, "entities", f"{k}.parquet"))
  # tokens: the query tower's WordPiece ids; lexical: the same n-gram ids an entity title gets
  # (the query tower's lexical path, models/lexical_path.py).
  pq.write_table(pa.table(dict(
      entity_index=pa.array(np.arange(len(q_texts), dtype=np.int32)),
      text=pa.array(q_texts, pa.string()),
      tokens=_int32_lists(q_tokens),
      lexical=_int32_lists([vocab.encode(q) for q in q_texts]))),
      os.path.join(out_dir, "entities", "queries.parquet"))
  seconds["entities"] = time.perf_counter() - clock - sum(seconds.values())

  judged = _judged_negatives(raw_dir, d, index, q_index, train_queries=set(qi[train].tolist()),
                             out_dir=out_dir, bad=bad)

  # --- pairs ---
  caps = {"q2pin": d.pin_pair_cap, "q2product": d.product_pair_cap, "q2query": None}
  pairs, dropped = {"train": {}, "eval": {}}, {"q2query_self_click": 0}
  for t, task in enumerate(tqdm(schema.TASK_ENTITY, desc="pairs", leave=False)):
    rng = np.random.default_rng([config.seed, t])  # per task, independent of the other tasks
    sel = log["kind"] == schema.TASK_ENTITY[task]
    if task == "q2query":  # a query "clicking" itself teaches nothing
      self_click = sel & (qi == log["entity"])
      dropped["q2query_self_click"] = int(self_click.sum())
      sel &= ~self_click
    for name, s in (("train", sel & train), ("eval", sel & (split == 2))):
      rows = np.flatnonzero(s)
      if name == "train" and caps[task]:
        rows = rows[features.cap_pairs(log["entity"][rows], caps[task], rng)]
      records = [schema.encode_pair(a, b, c, e, q_tokens[a]) for a, b, c, e in zip(
          qi[rows].tolist(), log["entity"][rows].tolist(), log["engagement"][rows].tolist(),
          log["timestamp"][rows].tolist())]
      _write_shards(records, os.path.join(out_dir, name, task), d.num_shards, rng)
      pairs[name][task] = len(records)
  seconds["pairs"] = time.perf_counter() - clock - sum(seconds.values())

  summary = dict(
      vocab=dict(query=tokenizer.vocab_size, trigram=len(vocab.trigrams),
                 unigram=len(vocab.unigrams), bigram=len(vocab.bigrams), V=vocab.size),
      query_vocab_source=d.query_vocab_file or "learned",
      entities=dict(pins=len(ents["pins"]["ids"]), products=len(ents["products"]["ids"]),
                    queries=len(q_texts)),
      pairs=pairs, dropped_pairs=dropped, bad_rows=bad, judged_negatives=judged,
      raw_rows={name: t.num_rows for name, t in raw.items()},
      split=dict(kind="column" if "split" in log else "time", train_end=train_end,
                 eval_start=eval_start,
                 eval_end=None if train_end is None else (last_day + 1) * DAY,
                 log_rows=dict(train=int(train.sum()), gap=int((split == 1).sum()),
                               eval=int((split == 2).sum())),
                 board_saves_train=int(in_train.sum())),
      features=dict(pins_with_board_titles=len(boards),
                    engaged_refresh_days=d.engaged_refresh_days,
                    engaged_lists_not_certified_exact={k: len(v) for k, v in uncertain.items()},
                    entities_with_engaged_queries={k: len({e for e, _ in engaged[k]})
                                                   for k in engaged}),
      seconds={k: round(v, 2) for k, v in seconds.items()},
      config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary


def prepare_workdir(config, workdir: str) -> dict:
  """`launch.py prepare` of OmniSearchSage: `config.data.raw_dir`, or a synthetic world generated
  into <workdir>/raw when it is empty, -> prepared_dir_of(config, workdir). Prints the bad-row
  table; returns the summary."""
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
