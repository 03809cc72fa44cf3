"""benchmarks/prepare_scale.py: the world scales every count, and the memory sampler sees the
whole process tree (a grandchild's allocation counts)."""

import subprocess
import sys
import time

import psutil

from benchmarks import prepare_scale


def test_scaled_world_multiplies_every_count_and_keeps_the_vocabulary():
  one, five = prepare_scale.scaled_config(1), prepare_scale.scaled_config(5)
  for name in prepare_scale.SCALED:
    assert five.synthetic[name] == 5 * one.synthetic[name] > 0
  assert five.synthetic.words_per_topic == one.synthetic.words_per_topic
  assert five.synthetic.num_topics == one.synthetic.num_topics


def test_tree_memory_counts_a_grandchilds_allocation():
  # A child that starts a grandchild holding ~400 MB of touched pages, then waits.
  grandchild = "import time; b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
               "print('ready', flush=True); time.sleep(60)"
  child = subprocess.Popen(
      [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
       f"{grandchild!r}], stdout=sys.stdout); p.wait()"], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "ready"
    proc = psutil.Process(child.pid)
    assert len(proc.children(recursive=True)) == 1
    total = prepare_scale.tree_memory(proc)
    alone = proc.memory_full_info().pss
    assert total - alone > 380 * 2**20, (total, alone)
  finally:
    for p in psutil.Process(child.pid).children(recursive=True):
      p.kill()
    child.kill()
    child.wait()


def test_a_failing_child_is_reported_not_raised(tmp_path):
  start = time.time()
  out = prepare_scale.measured("pipeline", 1.0, 120, out=str(tmp_path / "missing"),
                               pipeline_batches=1)
  assert "error" in out and out["peak_gb"] >= 0
  assert time.time() - start < 120


def test_the_in_memory_prepare_is_checked_out_from_its_commit(tmp_path):
  """The baseline the benchmark measures is the in-memory prepare of IN_MEMORY_REF (a worktree of
  this clone); a commit the clone lacks gives "" (not measured), not an error."""
  import os
  import subprocess

  import pytest
  directory = prepare_scale.in_memory_checkout(prepare_scale.IN_MEMORY_REF,
                                               str(tmp_path / "old"))
  if not directory:
    pytest.skip(f"this clone lacks commit {prepare_scale.IN_MEMORY_REF} (shallow?)")
  try:
    with open(os.path.join(directory, "omnisage", "data", "omnisearchsage", "prepare.py")) as f:
      old = f.read()
    assert 'ENGINES = ("local", "ray")' in old and "def _engaged_queries(" in old
    with open(os.path.join(directory, "benchmarks", "prepare_scale.py")) as f:
      assert '"--engine", choices=("ray", "local")' in f.read()   # the child flag run_scale passes
  finally:
    subprocess.run(["git", "-C", prepare_scale.ROOT, "worktree", "remove", "--force", directory])
  assert prepare_scale.in_memory_checkout("0" * 40, str(tmp_path / "none")) == ""
