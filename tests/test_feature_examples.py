"""Examples that carry their features (feature_examples.py) and the training input over them
(feature_pipeline.FeatureTrainData), against a plain reference built from the prepared Parquet
entity tables and the pair shards on the tiny world: every row of a batch is the pair the
shuffle puts there, with its entity table rows padded or cropped; negatives are table rows; the
structure is the compile-only batch spec (aot.abstract_batch); exact resume; `launch.py train`
builds missing examples. Per-host reads: tests/test_multihost.py; 1 vs 8 devices:
tests/test_train_sharded.py; SIGKILL and resume: tests/test_resume.py (all on this input)."""

import collections
import glob
import os
import shutil

import grain
import numpy as np
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from omnisage.data.omnisearchsage import feature_examples, hard_negatives, schema
from omnisage.data.omnisearchsage.feature_pipeline import ChunkShuffle, FeatureTrainData
from omnisage.data.omnisearchsage.pipeline import task_batch_sizes
from omnisage.data.omnisearchsage.query_input import lexical_len
from omnisage.train.omnisearchsage.aot import abstract_batch
from tests.helpers import common_flags, last_json, run_launch


@pytest.fixture(scope="module")
def world(tiny_prepared, tmp_path_factory):
  """(config, a private copy of the tiny prepared dir with feature examples)."""
  config, prepared = tiny_prepared
  copy = str(tmp_path_factory.mktemp("feature_examples") / "prepared")
  shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  feature_examples.write_feature_examples(config, copy)
  return config, copy


def chunk_order(count: int, chunk: int, seed: int):
  """The documented order of a task's examples (feature_pipeline.py), written out: position ->
  record, epoch e visiting the full chunks in the e-th order of a reseeded Grain shuffle, then the
  partial chunk."""
  full = count // chunk
  chunks = grain.MapDataset.range(max(full, 1)).seed(seed).shuffle().repeat()

  def record(position: int) -> int:
    epoch, offset = divmod(position, count)
    if offset >= full * chunk:
      return offset
    return chunks[epoch * full + offset // chunk] * chunk + offset % chunk
  return record


def padded(values, width: int) -> np.ndarray:
  out = np.zeros(width, np.int32)
  values = list(values or [])[:width]
  out[:len(values)] = values
  return out


class Reference:
  """What a batch must hold, from the prepared files read the plainest way: Parquet rows as
  Python lists, pair records in shard order, hard-negative tables as sets per query."""

  def __init__(self, config, prepared: str):
    self.config, self.prepared = config, prepared
    self.tables = {kind: pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet"))
                   .to_pydict() for kind in schema.ENTITY_KINDS}
    self.sizes = {kind: len(t["entity_index"]) for kind, t in self.tables.items()}
    self.pairs, self.orders = {}, {}
    for i, task in enumerate(task_batch_sizes(config)):
      pairs = []   # in the examples' record order: shard i's pairs as example_order puts them
      for shard, path in enumerate(sorted(glob.glob(os.path.join(prepared, "train", task,
                                                                 "*.array_record")))):
        reader = ArrayRecordReader(path)
        records = [schema.decode_pair(r) for r in reader.read_all()]
        reader.close()
        order = feature_examples.example_order(config.seed, task, shard, len(records))
        pairs += [(records[j]["query_index"], records[j]["entity_index"]) for j in order]
      self.pairs[task] = pairs
      self.orders[task] = chunk_order(len(pairs), feature_examples.RECORDS_PER_CHUNK,
                                      config.seed + 1000 * i)

  def pair_at(self, task: str, position: int) -> tuple[int, int]:
    return self.pairs[task][self.orders[task](position)]

  def hard_pools(self, task: str) -> dict[int, set[int]] | None:
    directory = hard_negatives.table_dir(self.prepared, self.config.data.hard_negatives_dir)
    paths = glob.glob(os.path.join(directory, f"{task}.parquet"))
    paths += glob.glob(os.path.join(directory, f"{task}.*.parquet"))
    if not paths:
      return None
    pools = collections.defaultdict(set)
    for path in paths:
      table = pq.read_table(path).to_pydict()
      for q, e in zip(table["query_index"], table["entity_index"]):
        pools[q].add(e)
    return pools

  def inputs(self, kind: str, index: int) -> dict:
    """The model inputs of one entity, keyed tokens, fields, continuous, legacy, has_legacy."""
    row = {key: column[index] for key, column in self.tables[kind].items()}
    d = self.config.data
    if kind == "queries":
      tokens = padded(row["tokens"], d.batch_query_len)
      width = lexical_len(self.config)
      if width:
        tokens = np.concatenate([tokens, padded(row["lexical"], width)])
      return {"tokens": tokens}
    legacy = np.zeros(schema.LEGACY_DIM, np.float32)
    if row["legacy"] is not None:
      legacy[:] = row["legacy"]
    continuous = np.zeros(2 * schema.LEGACY_DIM + schema.VISUAL_DIM, np.float32)
    slot = 0 if kind == "pins" else schema.LEGACY_DIM   # [pinsage | itemsage | visual]
    continuous[slot:slot + schema.LEGACY_DIM] = legacy
    if row["visual"] is not None:   # held as float16
      continuous[2 * schema.LEGACY_DIM:] = np.asarray(row["visual"], np.float16)
    return {"tokens": padded(row["tokens"], d.max_entity_tokens),
            "fields": padded(row["fields"], d.max_entity_tokens), "continuous": continuous,
            "legacy": legacy, "has_legacy": np.bool_(row["legacy"] is not None)}


def assert_entity(batch: dict, prefix: str, slot, kind: str, index: int, reference, what: str):
  for key, want in reference.inputs(kind, index).items():
    if f"{prefix}_{key}" in batch:
      np.testing.assert_array_equal(batch[f"{prefix}_{key}"][slot], want,
                                    err_msg=f"{what} {prefix}_{key} (entity {index})")


def check_against_reference(config, prepared: str, steps: int = 3) -> list[dict]:
  """The first `steps` batches of one host against the Reference; returns them."""
  reference = Reference(config, prepared)
  it = FeatureTrainData(config, prepared, 0, 1).iterator()
  batches = [next(it) for _ in range(steps)]
  spec = abstract_batch(config)
  n, k = int(config.loss.random_negatives), int(config.loss.get("hard_negatives", 0))
  for step, batch in enumerate(batches):
    assert set(batch) == set(spec)
    for task, b in batch.items():
      kind, size = schema.TASK_ENTITY[task], int(config.tasks[task])
      assert {key: (v.shape, np.dtype(v.dtype)) for key, v in b.items()} == \
             {key: (v.shape, np.dtype(v.dtype)) for key, v in spec[task].items()}, task
      pools = reference.hard_pools(task) if k else None
      for row in range(size):
        what = f"step {step} {task} row {row}"
        query, pos = reference.pair_at(task, step * size + row)
        assert (b["query_ids"][row], b["pos_ids"][row]) == (query, pos), what
        np.testing.assert_array_equal(b["query_tokens"][row],
                                      reference.inputs("queries", query)["tokens"], err_msg=what)
        assert_entity(b, "pos", row, kind, pos, reference, what)
        if k:   # a sample of the query's hard negatives other than the positive; zeros beyond
          valid, ids = b["hard_valid"][row], b["hard_ids"][row]
          pool = (pools or {}).get(query, set()) - {pos}
          kept = min(k, len(pool), feature_examples.HARD_KEPT)
          assert valid.sum() == kept and set(ids[valid].tolist()) <= pool, what
          assert len(set(ids[valid].tolist())) == valid.sum(), what
          for s in range(k):
            if valid[s]:
              assert_entity(b, "hard", (row, s), kind, int(ids[s]), reference, what)
            else:
              assert not any(b[key][row, s].any() for key in b if key.startswith("hard_")
                             and key != "hard_valid"), what
      # Random negatives: table rows, distinct within a step (a pass over a shuffled stream).
      assert len(set(b["neg_ids"].tolist())) == min(n, reference.sizes[kind])
      for slot, index in enumerate(b["neg_ids"].tolist()):
        assert_entity(b, "neg", slot, kind, index, reference, f"step {step} {task} negative")
      np.testing.assert_allclose(b["neg_log_q"], np.log(n / reference.sizes[kind]), rtol=1e-6)
      if "compat_neg_ids" in b:   # drawn from the entities that have a legacy vector
        legacy = reference.tables[kind]["legacy"]
        pool = sum(v is not None for v in legacy)
        for slot, index in enumerate(b["compat_neg_ids"].tolist()):
          assert legacy[index] is not None
          np.testing.assert_array_equal(b["compat_neg_legacy"][slot], legacy[index])
        np.testing.assert_allclose(b["compat_neg_log_q"], np.log(n / pool), rtol=1e-6)
  return batches


@pytest.mark.parametrize("count", [37, 40, 3])
def test_chunk_shuffle_visits_every_record_once_per_epoch_in_whole_chunks(count):
  chunk, orders = 4, []
  shuffle = ChunkShuffle(count, chunk, seed=5)
  for epoch in range(3):
    order = [shuffle[epoch * count + p] for p in range(count)]
    assert sorted(order) == list(range(count)), epoch
    full = count // chunk * chunk
    for start in range(0, full, chunk):   # a whole chunk, in order
      assert order[start] % chunk == 0
      assert order[start:start + chunk] == list(range(order[start], order[start] + chunk))
    assert order[full:] == list(range(full, count))   # the partial chunk closes the epoch
    orders.append(order)
  if count >= 2 * chunk:
    assert orders[0] != orders[1] != orders[2]   # reseeded every epoch


def test_example_shards_hold_their_pair_shards_in_example_order(world):
  config, prepared = world
  for task in task_batch_sizes(config):
    pair_paths = sorted(glob.glob(os.path.join(prepared, "train", task, "*.array_record")))
    for shard, path in enumerate(pair_paths):
      pairs = ArrayRecordReader(path).read_all()
      examples = ArrayRecordReader(os.path.join(feature_examples.directory_of(prepared), "train",
                                                task, os.path.basename(path))).read_all()
      order = feature_examples.example_order(config.seed, task, shard, len(pairs))
      assert sorted(order.tolist()) == list(range(len(pairs)))
      got = [(int(a["query_ids"][0]), int(a["pos_ids"][0]))
             for a in map(feature_examples.decode_arrays, examples)]
      want = [(p["query_index"], p["entity_index"])
              for p in (schema.decode_pair(pairs[j]) for j in order)]
      assert got == want, (task, shard)


def test_records_round_trip():
  arrays = {"a": np.arange(5, dtype=np.int32), "b": np.ones((2, 3), np.float16),
            "c": np.array([True, False]), "d": np.zeros(0, np.int8)}
  back = feature_examples.decode_arrays(feature_examples.encode_arrays(arrays))
  assert list(back) == list(arrays)
  for key, value in arrays.items():
    assert back[key].dtype == value.dtype
    np.testing.assert_array_equal(back[key], value)


def test_a_batch_of_records_decodes_as_their_concatenation():
  rng = np.random.default_rng(0)
  parts = []
  for n in (2, 0, 3, 1):
    lengths = rng.integers(0, 5, n).astype(np.int32)
    parts.append({"e_ids": np.arange(n, dtype=np.int32), "e_lengths": lengths,
                  "e_tokens": rng.integers(0, 99, lengths.sum()).astype(np.int32),
                  "e_legacy": rng.normal(size=(n, 4)).astype(np.float32),
                  "e_has_legacy": rng.random(n) < 0.5})
  arrays, rows = feature_examples.decode_batch([feature_examples.encode_arrays(p) for p in parts])
  assert list(arrays) == list(parts[0])
  for key in parts[0]:
    want = np.concatenate([p[key] for p in parts])
    assert arrays[key].dtype == want.dtype and arrays[key].flags.writeable
    np.testing.assert_array_equal(arrays[key], want, err_msg=key)
    np.testing.assert_array_equal(rows[key], [len(p[key]) for p in parts])
  other = feature_examples.encode_arrays({"other": np.zeros(1, np.int32)})
  with pytest.raises(ValueError, match="layouts"):
    feature_examples.decode_batch([feature_examples.encode_arrays(parts[0]), other])


def test_batches_match_the_entity_tables_and_pair_shards(world):
  config, prepared = world
  meta = feature_examples.read_meta(prepared)
  reference = Reference(config, prepared)
  assert meta["pairs"] == {task: len(p) for task, p in reference.pairs.items()}
  assert meta["negatives"] == reference.sizes
  assert meta["compat"] == {k: sum(v is not None for v in reference.tables[k]["legacy"])
                            for k in ("pins", "products")}
  check_against_reference(config, prepared, steps=3)


def test_no_random_negatives(world):
  """loss.random_negatives = 0 (in-batch negatives only): negative arrays with no row, as the
  batch spec has them, and the examples still checked against the reference."""
  config, prepared = world
  config = config.copy_and_resolve_references()
  config.loss.random_negatives = 0
  batch = check_against_reference(config, prepared, steps=1)[0]
  for task, b in batch.items():
    assert b["neg_ids"].shape == (0,) and b["neg_tokens"].shape[0] == 0, task


def test_the_reference_check_catches_wrong_features(world, monkeypatch):
  """A pipeline that pairs a row with its neighbour's positive features must fail the check."""
  from omnisage.data.omnisearchsage import feature_pipeline
  config, prepared = world
  original = feature_pipeline.ExampleBatches.map

  def shifted(self, step):
    batch = original(self, step)
    batch["pos_tokens"] = np.roll(batch["pos_tokens"], 1, axis=0)
    return batch

  monkeypatch.setattr(feature_pipeline.ExampleBatches, "map", shifted)
  with pytest.raises(AssertionError, match="pos_tokens"):
    check_against_reference(config, prepared, steps=1)


def test_lexical_queries_and_hard_negatives(world, tmp_path):
  config, source = world
  prepared = str(tmp_path / "prepared")
  shutil.copytree(source, prepared)
  config = config.copy_and_resolve_references()
  config.model.query.lexical, config.loss.hard_negatives = True, 3
  sizes = Reference(config, prepared).sizes
  rng = np.random.default_rng(0)
  for task, kind in (("q2pin", "pins"), ("q2query", "queries")):   # q2product: no table
    hard_negatives.write_table(os.path.join(prepared, "hard_negatives", f"{task}.parquet"),
                               rng.integers(0, sizes["queries"], 4000),
                               rng.integers(0, sizes[kind], 4000), "model")
  assert not feature_examples.is_current(config, prepared)   # a new input: stale
  feature_examples.ensure_feature_examples(config, prepared)
  assert feature_examples.is_current(config, prepared)
  batches = check_against_reference(config, prepared, steps=2)
  for task, batch in batches[0].items():
    assert batch["hard_valid"].any() == (task != "q2product"), task


def test_exact_resume_from_the_iterator_state(world):
  config, prepared = world
  it = FeatureTrainData(config, prepared, 0, 1).iterator()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = FeatureTrainData(config, prepared, 0, 1).iterator()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for task in want:
      for key in want[task]:
        np.testing.assert_array_equal(got[task][key], want[task][key], err_msg=f"{task} {key}")


def test_launch_train_builds_missing_examples(world, tmp_path):
  config, source = world
  prepared = str(tmp_path / "prepared")   # without examples: the trainer builds them
  shutil.copytree(source, prepared, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  result = run_launch("train", *common_flags(tmp_path / "run", prepared), "--config.train.steps=4",
                      "--config.train.log_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["train"]
  assert summary["steps"] == 4 and np.isfinite(summary["final_loss"]), summary
  assert feature_examples.is_current(config, prepared)
