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
from omnisage.data.omnisearchsage.entity_rows import encode_entities, field_items, valid_entities
from omnisage.data.omnisearchsage.input_checks import InputChecks
from omnisage.data.omnisearchsage.log_rows import (
  DAY,
  queries_table,
  remove_stale_judged,
  time_range,
  valid_judged,
  valid_log,
  valid_saves,
  write_judged,
)
from omnisage.data.omnisearchsage.raw_tables import read_raw_table


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
  """The optional judged_negatives table -> <out>/hard_negatives/<task>.judged.parquet; its bad
  rows counted by reason (log_rows.valid_judged). Returns {task: rows written}."""
  directory = remove_stale_judged(out_dir)
  if not os.path.exists(os.path.join(raw_dir, "judged_negatives.parquet")):
    return {}
  rows, judged = valid_judged(read_raw_table(raw_dir, "judged_negatives"), d, index, q_index,
                              train_queries)
  bad["judged_negatives"] = rows.counts()
  return write_judged(directory, judged)


def prepare(config, raw_dir: str, out_dir: str) -> dict:
  """Builds `out_dir` from the raw tables in `raw_dir`; returns the summary also in meta.json."""
  d, clock, seconds = config.data, time.perf_counter(), {}
  raw = {name: read_raw_table(raw_dir, name) for name in schema.RAW_TABLES}
  checks = InputChecks(config, raw_dir)
  checks.not_empty({name: t.num_rows for name, t in raw.items()})
  # An explicit split replaces the time split: timestamps need not be dates there (log_rows).
  valid_times = time_range("split" in raw["queries_log"].column_names)
  bad: dict = {}
  ents = {k: valid_entities(raw[k], k, d, bad) for k in ("pins", "products")}
  for k in ents:
    checks.valid_entities(k, len(ents[k]["ids"]), raw[k].num_rows, bad[k])
  index = {k: {i: n for n, i in enumerate(e["ids"])} for k, e in ents.items()}
  rows, log = valid_log(raw["queries_log"], index, d, valid_times)
  bad["queries_log"] = rows.counts()
  checks.valid_log(len(log["timestamp"]), raw["queries_log"].num_rows, bad["queries_log"])
  rows, saves = valid_saves(raw["board_saves"], index["pins"], d, valid_times)
  bad["board_saves"] = rows.counts()
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
  checks.training_rows(set(log["kind"][train].tolist()), bad["queries_log"])

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
  pq.write_table(queries_table(np.arange(len(q_texts)), q_texts, q_tokens,
                              [vocab.encode(q) for q in q_texts]),
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


ENGINES = ("local", "ray")   # config.data.engine: this function, or ray_prepare.prepare_on_ray


def prepare_workdir(config, workdir: str) -> dict:
  """`launch.py prepare` (and `demo`) of OmniSearchSage: `config.data.raw_dir`, or a synthetic
  world generated into <workdir>/raw when it is empty, -> prepared_dir_of(config, workdir), by
  the engine `config.data.engine`: "local" (`prepare`, in this process) or "ray" (the same
  directory from Ray Data: ray_prepare.prepare_on_ray on the Ray instance of
  `config.data.ray_address`, a private local one when unset; docs/scale_out.md). Prints the
  bad-row table; returns the summary."""
  from omnisage.data.omnisearchsage import synthetic
  from omnisage.data.workdir import prepared_dir_of
  engine = config.data.get("engine", "local")
  if engine not in ENGINES:
    raise ValueError(f"config.data.engine must be one of {ENGINES}, got {engine!r}")
  t0 = time.time()
  raw_dir, generated = config.data.raw_dir, False
  if not raw_dir:
    raw_dir = os.path.join(workdir, "raw")
    synthetic.generate(config.synthetic, config.seed, raw_dir)
    generated = True
  out_dir = prepared_dir_of(config, workdir)
  if engine == "ray":   # imported here: the local engine never pays for importing Ray
    from omnisage.data.omnisearchsage.ray_prepare import prepare_on_ray
    from omnisage.data.ray_runtime import init_ray
    init_ray(config.data.get("ray_address") or None)
    summary = prepare_on_ray(config, raw_dir, out_dir)
  else:
    summary = prepare(config, raw_dir, out_dir)
  print_bad_rows(summary.get("bad_rows", {}))
  return {"raw_dir": raw_dir, "prepared_dir": out_dir, "synthetic": generated, "engine": engine,
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
