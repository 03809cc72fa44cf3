"""benchmarks/accelerator.sh --dry-run: the accelerator path end to end on CPU.

Makes tiny shards (TensorFlow tokenises, as on the CPU side of the real path), then trains from
them in benchmarks/accelerator.py, which must not import TensorFlow, and ends with one JSON line.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


def test_dry_run_trains_from_shards_without_tensorflow(tmp_path):
  pytest.importorskip("tensorflow_text")   # the shards are tokenised by tf-text
  env = dict(subprocess_env(), PYTHON=sys.executable, PREPARED=str(tmp_path / "prepared"))
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "accelerator.sh"), "--dry-run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "prepared" / "meta.json").exists()
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["benchmark"] == "accelerator" and summary["dry_run"] is True
  assert summary["tensorflow_imported"] is False
  best = summary["best"]
  assert best["pairs"] > 0 and best["pairs_per_second"] > 0 and best["step_ms"] > 0
  assert 0 < best["mfu"]["measured_f32"] < 1
