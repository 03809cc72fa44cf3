"""Examples that carry their features (feature_examples.py) and the catalogue-free pipeline over
them (feature_pipeline.py), against today's pipeline.TrainData on the tiny world: same keys, shapes
and dtypes; the same pairs with the same positive features; negatives that are the catalogue's
rows; exact resume; hosts that read disjoint rows and share the negatives; `launch.py train`, and
its exact resume after a SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from omnisage.data.omnisearchsage import feature_examples, hard_negatives, pipeline, schema
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from tests import test_resume, test_train_sharded
from tests.helpers import ROOT, common_flags, last_json, run_launch, subprocess_env
from tests.test_multihost import RecordingSource


@pytest.fixture(scope="module")
def world(tiny_prepared, tmp_path_factory):
  """(config, a private copy of the tiny prepared dir with feature examples, entity stores)."""
  config, prepared = tiny_prepared
  copy = str(tmp_path_factory.mktemp("feature_examples") / "prepared")
  shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  feature_examples.write_feature_examples(config, copy)
  return config, copy, pipeline.load_stores(copy, config.data)


def batches(data, steps: int) -> list[dict]:
  it = data.iterator()
  return [next(it) for _ in range(steps)]


def check_against_today(config, prepared, stores, steps=2, exact=("neg", "compat", "hard")):
  """Today's and the new pipeline's first batches: same structure, same pairs and positives;
  every negative is its catalogue row."""
  today = batches(pipeline.TrainData(config, prepared, stores, 0, 1), steps)
  new = batches(FeatureTrainData(config, prepared, 0, 1), steps)
  n = config.loss.random_negatives
  for k in range(steps):
    assert set(new[k]) == set(today[k])
    for task, batch in new[k].items():
      store = stores[schema.TASK_ENTITY[task]]
      assert set(batch) == set(today[k][task]), task
      for key, value in batch.items():
        want = today[k][task][key]
        assert (value.shape, value.dtype) == (want.shape, want.dtype), (task, key)
        if not key.startswith(exact):   # the pairs and their positives' features
          np.testing.assert_array_equal(value, want, err_msg=f"step {k} {task} {key}")
      # The negatives come from the stream: their features are the catalogue's rows.
      for key, value in store.gather(batch["neg_ids"], "neg").items():
        if key in batch:
          np.testing.assert_array_equal(batch[key], value, err_msg=f"{task} {key}")
      np.testing.assert_allclose(batch["neg_log_q"], np.log(n / store.size), rtol=1e-6)
      if "compat_neg_ids" in batch:
        assert store.has_legacy[batch["compat_neg_ids"]].all()
        np.testing.assert_array_equal(batch["compat_neg_legacy"],
                                      store.legacy[batch["compat_neg_ids"]])
  return today, new


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


def test_same_batches_as_today_but_the_negatives(world):
  config, prepared, stores = world
  meta = feature_examples.read_meta(prepared)
  assert meta["negatives"] == {kind: s.size for kind, s in stores.items()}
  assert meta["compat"] == {k: int(stores[k].has_legacy.sum()) for k in ("pins", "products")}
  check_against_today(config, prepared, stores, steps=3)


def test_lexical_queries_and_hard_negatives(world, tmp_path):
  config, source, _ = world
  prepared = str(tmp_path / "prepared")
  shutil.copytree(source, prepared)
  config = config.copy_and_resolve_references()
  config.model.query.lexical, config.loss.hard_negatives = True, 3
  stores = pipeline.load_stores(prepared, config.data, config.data.query_lexical_len)
  rng = np.random.default_rng(0)
  for task, kind in (("q2pin", "pins"), ("q2query", "queries")):   # q2product: no table
    hard_negatives.write_table(os.path.join(prepared, "hard_negatives", f"{task}.parquet"),
                               rng.integers(0, stores["queries"].size, 4000),
                               rng.integers(0, stores[kind].size, 4000), "model")
  assert not feature_examples.is_current(config, prepared)   # a new input: stale
  feature_examples.ensure_feature_examples(config, prepared)
  assert feature_examples.is_current(config, prepared)
  _, new = check_against_today(config, prepared, stores)
  for task, batch in new[0].items():
    ids, valid = batch["hard_ids"], batch["hard_valid"]
    table = hard_negatives.HardNegatives.load(prepared, task, stores["queries"].size,
                                              stores[schema.TASK_ENTITY[task]].size)
    if table is None:
      assert not valid.any() and not batch["hard_tokens"].any()
      continue
    assert valid.any()
    for row, (query, pos) in enumerate(zip(batch["query_ids"], batch["pos_ids"])):
      pool = set(table.entities[table.offsets[query]:table.offsets[query + 1]]) - {pos}
      assert set(ids[row][valid[row]]) <= pool and valid[row].sum() == min(3, len(pool))
    gathered = stores[schema.TASK_ENTITY[task]].gather(ids.ravel(), "hard")
    for key in ("hard_tokens", "hard_fields", "hard_continuous"):
      if key in batch:
        want = gathered[key].reshape(batch[key].shape)
        np.testing.assert_array_equal(batch[key][valid], want[valid], err_msg=f"{task} {key}")
        assert not batch[key][~valid].any()


def test_exact_resume_from_the_iterator_state(world):
  config, prepared, _ = world
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


def test_two_hosts_read_disjoint_rows_and_share_the_negatives(world, monkeypatch):
  config, prepared, _ = world
  monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", RecordingSource)

  def first_batches(host, hosts, steps=3):
    RecordingSource.reads = []
    ds = FeatureTrainData(config, prepared, host, hosts).dataset()
    return [ds[k] for k in range(steps)], RecordingSource.reads

  alone, alone_reads = first_batches(0, 1)
  host0, reads0 = first_batches(0, 2)
  host1, reads1 = first_batches(1, 2)
  # Each host reads half of every global batch and half of its negatives, each record once.
  assert len(reads0) == len(set(reads0)) == len(reads1) == len(set(reads1))
  assert not set(reads0) & set(reads1)
  assert set(reads0) | set(reads1) == set(alone_reads)
  assert {part for part, _, _ in alone_reads} == {"train", "negatives", "compat"}
  for k in range(3):
    for task, batch in alone[k].items():
      for key, value in batch.items():   # pairs, their features and the shared negatives
        joined = np.concatenate([host0[k][task][key], host1[k][task][key]])
        np.testing.assert_array_equal(joined, value, err_msg=f"step {k} {task} {key}")
  # Consecutive steps read consecutive runs of the negatives stream.
  pins = [i for part, kind, i in alone_reads if (part, kind) == ("negatives", "pins")]
  assert pins == list(range(3 * config.loss.random_negatives))


def test_launch_train_with_feature_examples(world, tmp_path):
  config, source, _ = world
  prepared = str(tmp_path / "prepared")   # without examples: the trainer builds them
  shutil.copytree(source, prepared, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  result = run_launch("train", *common_flags(tmp_path / "run", prepared),
                      "--config.data.feature_examples=True", "--config.train.steps=4",
                      "--config.train.log_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["train"]
  assert summary["steps"] == 4 and np.isfinite(summary["final_loss"]), summary
  assert feature_examples.is_current(config, prepared)


def test_loss_and_gradients_agree_on_1_and_8_devices(world):
  """tests/test_train_sharded.py's check, on a batch of the feature pipeline."""
  _, prepared, _ = world
  child = test_train_sharded._CHILD
  for old, new in (("pipeline import TrainData", "feature_pipeline import FeatureTrainData"),
                   ("next(TrainData(", "next(FeatureTrainData(")):
    assert old in child
    child = child.replace(old, new)
  result = subprocess.run([sys.executable, "-c", child, prepared], cwd=ROOT,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  one = out["1x1"]
  for mesh in ("8x1", "4x2"):
    assert abs(out[mesh]["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (mesh, out)
    assert out[mesh]["worst_grad_excess"] <= 1.0, (mesh, out[mesh])


def test_sigkill_and_resume_reproduces_the_losses_exactly(world, tmp_path):
  """tests/test_resume.py's check with data.feature_examples: the iterator state in the
  checkpoint resumes the example and negative streams where they were."""
  _, prepared, _ = world
  steps, flag = 12, "--config.data.feature_examples=True"
  reference, _ = test_resume.run([*test_resume.train_cmd(tmp_path / "reference", prepared, steps),
                                  flag])
  assert reference["steps"] == steps
  reference = test_resume.losses_by_step(tmp_path / "reference")
  workdir = tmp_path / "killed"
  process = subprocess.Popen([*test_resume.train_cmd(workdir, prepared, steps), flag], cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not test_resume.checkpoint_steps(workdir):
    if process.poll() is not None:
      pytest.fail("training finished before it could be killed")
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(test_resume.losses_by_step(workdir)) < steps, "the kill came too late"
  summary, _ = test_resume.run([*test_resume.train_cmd(workdir, prepared, steps), flag])
  assert summary["resumed_from"] is not None and summary["resumed_from"] >= 4
  resumed = test_resume.losses_by_step(workdir)
  assert sorted(resumed) == sorted(reference) == list(range(1, steps + 1))
  for step in resumed:
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])
