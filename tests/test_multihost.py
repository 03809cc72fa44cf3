"""Multi-host training for real: two processes on loopback (jax.distributed + gloo CPU collectives),
4 simulated CPU devices each, train exactly like one process with 8 devices.

The pipeline test builds both hosts' Grain pipelines (feature_pipeline.FeatureTrainData) in this
process and checks, record by record, that they read disjoint rows whose union (in host order) is
the one-host global batch, and that they share the random negatives. The training test runs
`launch.py train` as one 8-device process and as two 4-device processes (mesh data=8 in both) on
prepared copies without feature examples (the second process waits while the first builds them),
compares the per-step losses and the evaluations, and checks from the record indices each
process's data source served that the two processes read disjoint records.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from omnisage.data.omnisearchsage import feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from tests.helpers import ROOT, common_flags, subprocess_env

STEPS = 6


class RecordingSource:
  """An ArrayRecord data source that remembers which (split, task, record index) it served."""

  reads: list = []

  def __init__(self, paths, source=grain.sources.ArrayRecordDataSource):
    self.source = source(paths)
    task_dir = os.path.dirname(paths[0])
    self.key = (os.path.basename(os.path.dirname(task_dir)), os.path.basename(task_dir))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    RecordingSource.reads.append((*self.key, int(index)))
    return self.source[index]


def test_each_host_reads_only_its_rows_of_the_global_batch(tiny_prepared, monkeypatch):
  config, prepared = tiny_prepared
  feature_examples.ensure_feature_examples(config, prepared)   # as training builds them
  monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", RecordingSource)

  def first_batches(host, hosts, steps=3):
    RecordingSource.reads = []
    ds = FeatureTrainData(config, prepared, process_index=host, process_count=hosts).dataset()
    return [ds[k] for k in range(steps)], RecordingSource.reads

  alone, alone_reads = first_batches(0, 1)
  host0, reads0 = first_batches(0, 2)
  host1, reads1 = first_batches(1, 2)
  train = lambda reads: [r for r in reads if r[0] == "train"]
  pairs_per_step = sum(config.tasks[t] for t in ("q2pin", "q2product", "q2query"))
  assert len(set(train(alone_reads))) == 3 * pairs_per_step
  # Each host reads half of every global batch and half of its negatives, each record once, and
  # nothing the other reads.
  assert len(train(reads0)) == len(train(reads1)) == 3 * pairs_per_step // 2
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


# `launch.py` with its data source replaced by RecordingSource: argv[1] is a file to write the
# train-split record indices to when the process exits, the rest are launch.py's flags.
_CHILD = r"""
import atexit, json, runpy, sys
import grain
from tests.test_multihost import RecordingSource
out, sys.argv = sys.argv[1], ["launch.py", *sys.argv[2:]]
grain.sources.ArrayRecordDataSource = RecordingSource

def dump():
  with open(out, "w") as f:
    json.dump([r for r in RecordingSource.reads if r[0] == "train"], f)

atexit.register(dump)
runpy.run_path("launch.py", run_name="__main__")
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, prepared, name, devices, *extra):
  env = subprocess_env(devices)   # the repo root on PYTHONPATH: for tests.test_multihost
  args = [*common_flags(workdir, prepared), f"--config.train.steps={STEPS}",
          "--config.train.log_every=1", "--config.train.checkpoint_every=3", *extra]
  with open(os.path.join(workdir, f"{name}.log"), "w") as log:   # the child keeps its own copy
    return subprocess.Popen([sys.executable, "-c", _CHILD, os.path.join(workdir, f"{name}.json"),
                             "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)


def wait_all(procs: dict, timeout: float) -> dict:
  """{name: stdout}; if one process fails the others are killed (they would wait for it)."""
  deadline, outputs = time.time() + timeout, {}
  try:
    while len(outputs) < len(procs):
      for name, proc in procs.items():
        if name not in outputs and proc.poll() is not None:
          outputs[name] = proc.stdout.read()
          assert proc.returncode == 0, f"{name} exited with {proc.returncode}"
      assert time.time() < deadline, f"timed out after {timeout}s"
      time.sleep(0.5)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


def json_lines(stdout: str) -> list[dict]:
  """The JSON lines of a child's stdout (gloo prints its connection messages there too)."""
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
  """Workdirs of one 8-device process ("one") and two 4-device processes ("two"). Each gets a
  prepared copy without the feature examples: "two" builds them on process 0 while process 1
  waits at ensure_feature_examples's barrier (and the runs do not write one directory at once)."""
  _, prepared = tiny_prepared
  one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
  prepared_of = {}
  for name in ("one", "two"):
    prepared_of[name] = str(tmp_path_factory.mktemp(f"prepared_{name}") / "prepared")
    shutil.copytree(prepared, prepared_of[name],
                    ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  coordinator = f"--coordinator_address=127.0.0.1:{free_port()}"
  procs = {"one": start(one, prepared_of["one"], "one", 8)}
  for i in range(2):
    procs[f"two{i}"] = start(two, prepared_of["two"], f"two{i}", 4, coordinator,
                             "--num_processes=2", f"--process_id={i}")
  try:
    outputs = wait_all(procs, timeout=900)
  except AssertionError:
    logs = {n: open(d / f"{n}.log").read()[-3000:] for n, d in
            [("one", one), ("two0", two), ("two1", two)]}
    raise AssertionError(json.dumps(logs, indent=1)) from None
  return one, two, outputs


def test_two_processes_train_like_one_with_all_devices(runs):
  one, two, outputs = runs
  # Only process 0 prints the closing JSON line.
  assert json_lines(outputs["two1"]) == []
  summary_one = json_lines(outputs["one"])[-1]["train"]
  summary_two = json_lines(outputs["two0"])[-1]["train"]
  assert summary_one["steps"] == summary_two["steps"] == STEPS
  expected, got = losses(one), losses(two)
  assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
  # Same global batches and negatives; only the order of float reductions may differ (measured:
  # identical or within 8e-8 relative). Different data would differ in the first digits.
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, got)
  # Evaluation gathers the sharded tower outputs from both processes: the same recall.
  assert summary_two["recall@10"] == pytest.approx(summary_one["recall@10"], abs=1e-6)
  # Both processes wrote their parts of the same checkpoints in the shared workdir.
  assert sorted(os.listdir(two / "checkpoints")) == ["3", "6"]


def test_each_process_read_only_its_own_records(runs):
  _, two, _ = runs
  reads = []
  for i in range(2):
    with open(two / f"two{i}.json") as f:
      reads.append({tuple(r) for r in json.load(f)})
  # Every process read at least its half of the STEPS global batches (more with prefetching),
  # and no record was read by both: the runs stay within one epoch of every task.
  for task in ("q2pin", "q2product", "q2query"):
    per_process = [{r for r in rs if r[1] == task} for rs in reads]
    assert all(len(r) >= STEPS * 16 // 2 for r in per_process), task
    assert not per_process[0] & per_process[1], task
