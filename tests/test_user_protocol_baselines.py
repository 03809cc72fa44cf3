"""benchmarks/user_protocol_baselines.py on a slice of MovieLens: every method scored on the
per-user protocol, EASE's lambda chosen on validation, figures with standard errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

ML = os.path.join(os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared",
                                                                   "datasets")),
                  "movielens-latest-small")


@pytest.mark.skipif(not os.path.isdir(ML), reason=f"{ML} not found (../shared/datasets)")
def test_baselines_on_a_slice():
  result = subprocess.run([sys.executable, "benchmarks/user_protocol_baselines.py",
                           f"--movielens={ML}", "--max-users=40", "--ease-lambdas=20,500"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])["user_protocol"]
  assert out["users"] == 40
  methods = out["methods"]
  assert set(methods) == {"popularity", "popularity_recent", "item_knn", "ease"}
  for m in methods.values():
    for k in ("recall@10", "recall@50", "recall@100", "ndcg@10"):
      assert 0.0 <= m[k] <= 1.0 and m[f"{k}_se"] >= 0.0
    assert m["recall@10"] <= m["recall@50"] <= m["recall@100"]
  assert methods["ease"]["lambda"] in (20.0, 500.0)
  # Learned from co-occurrence, both beat the same list for everyone on this slice.
  assert methods["ease"]["recall@50"] > methods["popularity"]["recall@50"]
