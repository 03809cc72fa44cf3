"""Checkpoint and exact resume: a run killed with SIGKILL and resumed logs exactly the losses of an
uninterrupted run; a damaged newest checkpoint falls back to the previous one with a warning."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY_CONFIG, subprocess_env

STEPS = 24


def train_cmd(workdir, prepared, steps=STEPS):
  return [sys.executable, "launch.py", "train", f"--config={TINY_CONFIG}:tiny",
          f"--workdir={workdir}", f"--config.data.prepared_dir={prepared}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=3"]


def run(cmd):
  result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])["train"], result.stderr


def losses_by_step(workdir) -> dict[int, float]:
  """The LAST logged loss of every step (a resumed run logs the replayed steps again)."""
  out = {}
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    for record in map(json.loads, f):
      if "loss" in record:
        out[record["step"]] = record["loss"]
  return out


def checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared, tmp_path_factory):
  _, prepared = tiny_prepared
  workdir = tmp_path_factory.mktemp("uninterrupted")
  summary, _ = run(train_cmd(workdir, prepared))
  return workdir, summary


def test_sigkill_and_resume_reproduces_the_losses_exactly(tiny_prepared, uninterrupted, tmp_path):
  _, prepared = tiny_prepared
  reference_dir, _ = uninterrupted
  reference = losses_by_step(reference_dir)
  assert sorted(reference) == list(range(1, STEPS + 1))

  process = subprocess.Popen(train_cmd(tmp_path, prepared), cwd=ROOT, env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not [s for s in checkpoint_steps(tmp_path) if s >= 12]:
    if process.poll() is not None:
      pytest.fail("training finished before it could be killed")
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(losses_by_step(tmp_path))
  assert killed_at < STEPS, "the kill came too late to test anything"

  summary, _ = run(train_cmd(tmp_path, prepared))
  assert summary["resumed_from"] is not None and summary["resumed_from"] >= 12
  resumed = losses_by_step(tmp_path)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_prepared, uninterrupted, tmp_path):
  _, prepared = tiny_prepared
  reference_dir, _ = uninterrupted
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(reference_dir), str(workdir)], check=True)
  steps = checkpoint_steps(workdir)
  assert steps == [16, 20, 24]
  # Damage every data file of the newest checkpoint's state (a disk error, a bad copy).
  damaged = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "24", "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 0:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 3)
        damaged += 1
  assert damaged > 0
  # Same run length: the learning-rate schedule depends on it.
  summary, stderr = run(train_cmd(workdir, prepared))
  assert summary["resumed_from"] == 20
  assert "corrupt or partial" in stderr
  # Resuming from 20 replays steps 21..24 exactly (their new log lines come last).
  reference = losses_by_step(reference_dir)
  resumed = losses_by_step(workdir)
  for step in range(21, STEPS + 1):
    assert resumed[step] == reference[step]
