"""Step 5 of `launch.py prepare` on Ray Data: the queries table, judged negatives, pair shards.

Everything keyed by a query's entity_index, so it all needs the distinct query texts first:
  queries     every distinct normalised query of the logs (a unique()), the WordPiece vocabulary
              learned on the driver (TensorFlow) from the distinct train queries and their counts
              (a group-by), tokens by QueryTokens actors (map_batches), then lexical n-gram ids.
  judged      the optional judged_negatives table validated per row group (log_rows.valid_judged)
              -> <out>/hard_negatives/<task>.judged.parquet, rows in input order.
  pairs       the caps (features.cap_pairs with prepare's per-task generator) on the driver over
              the (row, entity) ints of the train rows in log order, so the kept pairs are exactly
              prepare's; records (schema.encode_pair) in map_batches, written by ArrayRecordSink
              (a Datasink) after a seeded random_shuffle into num_shards blocks; the three
              tasks side by side (task_pairs, each with prepare's generator of that task).

Driver-side here: the distinct texts and their tokens, the train query ids, the (row, entity)
columns the caps read, the kept judged negatives (ints). The pair blocks look queries up in the
sorted texts (an Arrow array) and slice their tokens from one flat int32 array: both are put in
the object store once and read there without a copy by every worker.

Usage:
  vocab_path = query_vocab(config, log, out_dir)
  queries = query_table(query_texts(log), vocab_path, ngrams, d)      # a dataset
  # or query_tokens(...) early, with_lexical(tokens, ngrams) once the n-gram vocabulary exists
  pairs, dropped = write_pairs(config, log, texts, tokens, out_dir)   # tokens: a list column
"""

import concurrent.futures
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from omnisage.data import text
from omnisage.data.omnisearchsage import features, schema
from omnisage.data.omnisearchsage.log_rows import (
  int32_lists,
  queries_table,
  remove_stale_judged,
  valid_judged,
  write_judged,
)
from omnisage.data.omnisearchsage.ray_blocks import (
  WHOLE_BLOCKS,
  check_raw_schema,
  driver_table,
  map_key_blocks,
  raw_path,
  read_validated,
  with_bad_rows,
)


# --- queries: distinct texts, WordPiece in map_batches, the queries table ------------------------
def query_texts(log: ray.data.Dataset) -> list[str]:
  """Every distinct normalised query of the logs, both sides of query->query, sorted: a
  unique() aggregation (the list is the queries table, so the driver holds it)."""
  def texts(t: pa.Table) -> pa.Table:
    targets = t.filter(pc.equal(t["kind"], "queries"))["target"]
    return pa.table(dict(text=pa.concat_arrays([t["query"].combine_chunks(),
                                                targets.combine_chunks()])))
  return sorted(log.map_batches(texts, **WHOLE_BLOCKS).unique("text"))


def train_queries(log: ray.data.Dataset) -> tuple[list[str], list[int]]:
  """The WordPiece learner's input, prepare's corpus (the train queries in log order, then the
  train query->query targets in log order) as its distinct texts in the order they first occur,
  with their counts (wordpiece.learn_vocab learns the same vocabulary from them): a group-by on
  text of (first position, count), so the driver holds distinct queries, not log rows."""
  def occurrences(t: pa.Table) -> pa.Table:
    t = t.filter(pc.equal(t["split"], 0))
    targets = t.filter(pc.equal(t["kind"], "queries"))
    return first_and_count(pa.table(dict(
        text=pa.concat_arrays([t["query"].combine_chunks(), targets["target"].combine_chunks()]),
        first=pa.array(np.r_[t["row"].to_numpy(), targets["row"].to_numpy() + TARGETS_AFTER]),
        count=pa.array(np.ones(t.num_rows + targets.num_rows, np.int64)))))

  table = driver_table(map_key_blocks(log.map_batches(occurrences, **WHOLE_BLOCKS), ["text"],
                                      first_and_count), pa.table(dict(
      text=pa.array([], pa.string()), first=pa.array([], pa.int64()),
      count=pa.array([], pa.int64()))))
  table = table.take(pc.sort_indices(table["first"]))
  return table["text"].to_pylist(), table["count"].to_pylist()


# train_queries: a target's position is its row plus this, after every query's (rows < 2^40).
TARGETS_AFTER = 1 << 40


def first_and_count(t: pa.Table) -> pa.Table:
  """(text, first, count) rows -> one row per text: its first position, its total count."""
  return t.group_by(["text"], use_threads=False).aggregate(
      [("first", "min"), ("count", "sum")]).rename_columns(["text", "first", "count"])


class QueryTokens:
  """map_batches UDF: the WordPiece tokens of query texts (column `tokens`). TensorFlow is
  imported in the Ray worker that runs it, never in the driver's training code."""

  def __init__(self, vocab_path: str, lower_case: bool, max_len: int):
    from omnisage.data import wordpiece
    self.tokenizer = wordpiece.QueryTokenizer(vocab_path, lower_case, max_len)

  def __call__(self, t: pa.Table) -> pa.Table:
    return t.append_column("tokens", int32_lists(self.tokenizer.tokenize(t["text"].to_pylist())))


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
    texts, counts = train_queries(log)
    wordpiece.write_vocab(wordpiece.learn_vocab(texts, d.query_vocab_size, d.query_lower_case,
                                                counts=counts), path)
  return path


def query_tokens(texts: list[str], vocab_path: str, d, workers: int = 1,
                 batch_size: int = 4096, on_driver: bool = False) -> ray.data.Dataset:
  """(entity_index, text, tokens) of every distinct query: WordPiece by `workers` QueryTokens
  actors. Needs only query_vocab.txt, so prepare runs it while the features are
  computed (an actor's TensorFlow import costs seconds). `on_driver`: QueryTokens in this
  process instead (prepare, for a few queries when the driver has learned the
  vocabulary, so TensorFlow is loaded here already), `batch_size` queries at a time."""
  table = pa.table(dict(entity_index=pa.array(np.arange(len(texts), dtype=np.int32)),
                        text=pa.array(texts, pa.string())))
  if on_driver:
    tokenize = QueryTokens(vocab_path, d.query_lower_case, d.query_max_len)
    return ray.data.from_arrow(pa.concat_tables(
        [tokenize(table.slice(start, batch_size))
         for start in range(0, max(len(texts), 1), batch_size)]))
  return ray.data.from_arrow(table).map_batches(
      QueryTokens, fn_constructor_args=(vocab_path, d.query_lower_case, d.query_max_len),
      batch_size=batch_size, batch_format="pyarrow", concurrency=workers)


def with_lexical(tokens: ray.data.Dataset, ngrams: text.NgramVocab) -> ray.data.Dataset:
  """The entities/queries.parquet columns: query_tokens' rows plus their n-gram (lexical) ids."""
  ref = ray.put(ngrams)

  def fn(t: pa.Table) -> pa.Table:
    texts, vocab = t["text"].to_pylist(), ray.get(ref)
    return queries_table(t["entity_index"].to_numpy(), texts,
                         list(t["tokens"].to_numpy(zero_copy_only=False)),
                         [vocab.encode(q) for q in texts])
  return tokens.map_batches(fn, **WHOLE_BLOCKS)


def query_table(texts: list[str], vocab_path: str, ngrams: text.NgramVocab, d,
                workers: int = 1) -> ray.data.Dataset:
  """The entities/queries.parquet columns: with_lexical(query_tokens(...))."""
  return with_lexical(query_tokens(texts, vocab_path, d, workers), ngrams)


# --- pairs: caps and the ArrayRecord datasink ----------------------------------------------------
class ArrayRecordSink(ray.data.Datasink):
  """Writes each input block of a dataset repartitioned into `num_shards` blocks as one shard
  <directory>/shard-i-of-n.array_record (schema.encode_pair records in column `record`); shards
  no block reached (fewer records than shards, or none) are written empty, as prepare's are.
  `written`: the records written, once write_datasink has returned."""

  def __init__(self, directory: str, num_shards: int):
    self.directory, self.num_shards, self.written = directory, num_shards, 0

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
      if not table.num_rows:   # an empty block may have no columns
        continue
      for record in table["record"].to_pylist():
        writer.write(record)
        n += 1
    writer.close()
    return n

  def on_write_complete(self, write_result) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    if not write_result.write_returns:   # no block came, so on_write_start was never called
      self.on_write_start()
    self.written = int(sum(write_result.write_returns))
    for s in range(self.num_shards):
      path = os.path.join(self.directory, schema.shard_name(s, self.num_shards))
      if not os.path.exists(path):
        ArrayRecordWriter(path, "group_size:1").close()


def pair_rows(log: ray.data.Dataset, texts_ref, task: str) -> ray.data.Dataset:
  """The log rows of one task with query index `qi` and positive `entity` (a query's index for
  q2query), q2query self-clicks marked (`self_click`). `texts_ref`: the sorted distinct texts (a
  query's index is its position there)."""
  kind = schema.TASK_ENTITY[task]

  def fn(t: pa.Table) -> pa.Table:
    texts = ray.get(texts_ref)
    t = t.filter(pc.equal(t["kind"], kind))
    qi = pc.index_in(t["query"], value_set=texts).to_numpy().astype(np.int64)
    entity = t["entity"].to_numpy()
    if kind == "queries":
      entity = pc.index_in(t["target"], value_set=texts).to_numpy().astype(np.int64)
    self_click = qi == entity if kind == "queries" else np.zeros(len(qi), bool)
    return pa.table(dict(row=t["row"], qi=pa.array(qi), entity=pa.array(entity),
                         engagement=t["engagement"], timestamp=t["timestamp"], split=t["split"],
                         self_click=pa.array(self_click)))
  return log.map_batches(fn, **WHOLE_BLOCKS)


def pair_mask(b: pa.Table, split: int):
  """The rows of split code `split` that make pairs (a q2query self-click teaches nothing)."""
  return pc.and_(pc.equal(b["split"], split), pc.invert(b["self_click"]))


def task_pairs(config, log: ray.data.Dataset, refs: tuple, t: int, task: str, out_dir: str
               ) -> tuple[dict, int]:
  """The train and eval shards of one task: ({split: pairs}, q2query self-clicks dropped). Its
  generator is prepare's for this task (caps first, then the shuffles' seeds), so the tasks are
  independent of one another and of the order they run in."""
  d = config.data
  cap = {"q2pin": d.pin_pair_cap, "q2product": d.product_pair_cap}.get(task)
  rng = np.random.default_rng([config.seed, t])
  rows = pair_rows(log, refs[0], task).materialize()
  self_clicks = int(rows.sum("self_click") or 0) if task == "q2query" and rows.count() else 0
  pairs = {}
  for name, code in (("train", 0), ("eval", 2)):
    keep = None
    if name == "train" and cap:
      table = driver_table(rows.map_batches(lambda b, c=code: b.filter(pair_mask(b, c)).select(
          ["row", "entity"]), **WHOLE_BLOCKS), pa.table(dict(
              row=pa.array([], pa.int64()), entity=pa.array([], pa.int64()))))
      table = table.take(pc.sort_indices(table["row"]))
      keep = table["row"].to_numpy()[features.cap_pairs(table["entity"].to_numpy(), cap, rng)]

    def records(b: pa.Table, code=code, keep=keep) -> pa.Table:
      values, offsets = ray.get(refs[1])
      b = b.filter(pair_mask(b, code))
      if keep is not None:
        b = b.filter(pa.array(np.isin(b["row"].to_numpy(), keep)))
      return pa.table(dict(record=pa.array([schema.encode_pair(
          a, e, g, s, values[offsets[a]:offsets[a + 1]]) for a, e, g, s in zip(
          b["qi"].to_pylist(), b["entity"].to_pylist(), b["engagement"].to_pylist(),
          b["timestamp"].to_pylist())], pa.binary())))

    sink = ArrayRecordSink(os.path.join(out_dir, name, task), d.num_shards)
    rows.map_batches(records, **WHOLE_BLOCKS).random_shuffle(
        seed=int(rng.integers(2**31))).repartition(d.num_shards).write_datasink(sink)
    pairs[name] = sink.written
  return pairs, self_clicks


def write_pairs(config, log: ray.data.Dataset, texts: list[str], tokens: pa.ChunkedArray,
                out_dir: str) -> tuple[dict, dict]:
  """Step 5's pair shards: ({split: {task: pairs}}, dropped) as prepare's. `texts`: the sorted
  distinct queries (query_texts); `tokens`: their WordPiece ids, a list column (the queries
  table's `tokens`). The caps (features.cap_pairs with prepare's per-task generator) run on the
  driver over the entity column of the capped task's train rows in log order (ints only);
  records are built in map_batches and written by ArrayRecordSink after a seeded
  random_shuffle. The three tasks run side by side (task_pairs, one driver thread each): their
  Ray Data jobs are small, and mostly wait on task start-up, which overlaps."""
  tokens = tokens.combine_chunks()
  flat = (tokens.values.to_numpy().astype(np.int32), tokens.offsets.to_numpy().astype(np.int64))
  refs = ray.put(pa.array(texts, pa.string())), ray.put(flat)
  with concurrent.futures.ThreadPoolExecutor(len(schema.TASK_ENTITY)) as pool:
    done = list(pool.map(lambda job: task_pairs(config, log, refs, *job, out_dir),
                         enumerate(schema.TASK_ENTITY)))
  pairs = {name: {task: n[name] for task, (n, _) in zip(schema.TASK_ENTITY, done)}
           for name in ("train", "eval")}
  return pairs, {"q2query_self_click": sum(clicks for _, clicks in done)}


# --- judged negatives ---------------------------------------------------------------------------
def train_query_ids(log: ray.data.Dataset, q_index: dict) -> set:
  """The query_index of every query with a training row (the queries a judged negative may
  join): a unique() over the train rows."""
  train = log.map_batches(lambda t: t.filter(pc.equal(t["split"], 0)).select(["query"]),
                          **WHOLE_BLOCKS)
  return {q_index[q] for q in train.unique("query")}


def judged_block(table: pa.Table, start: int, ref, d) -> pa.Table:
  """log_rows.valid_judged of one block, as summary rows (`ref`: the broadcast id maps)."""
  entity_ids, q_index, train_ids = ray.get(ref)
  rows, judged = valid_judged(table, d, entity_ids, q_index, train_ids)
  return with_bad_rows(pa.table(dict(task=pa.array(judged["task"], pa.string()),
                                     query_index=pa.array(judged["query_index"]),
                                     entity_index=pa.array(judged["entity_index"]))), rows, start)


def judged_negatives(config, raw_dir: str, out_dir: str, entity_ids: dict, texts: list[str],
                     log: ray.data.Dataset) -> tuple[dict, dict | None]:
  """prepare's judged negatives: ({task: rows written}, its bad-row counts or None when the
  raw dir has no judged_negatives table). `texts`: the sorted distinct queries. Stale tables of
  an earlier run are removed first."""
  directory = remove_stale_judged(out_dir)
  if not os.path.exists(raw_path(raw_dir, "judged_negatives")):
    return {}, None
  check_raw_schema(raw_dir, "judged_negatives")
  q_index = {q: i for i, q in enumerate(texts)}
  ref = ray.put((entity_ids, q_index, train_query_ids(log, q_index)))
  good, bad, _ = read_validated(raw_dir, "judged_negatives", judged_block, ref=ref, d=config.data)
  table = driver_table(good, None)
  if table is None:
    return {}, bad
  table = table.take(pc.sort_indices(table["row"]))    # input order, as prepare writes them
  return write_judged(directory, dict(
      task=np.asarray(table["task"].to_pylist(), object),
      query_index=table["query_index"].to_numpy(), entity_index=table["entity_index"].to_numpy(),
  )), bad
