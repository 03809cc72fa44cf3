"""`launch.py demo` end to end on the tiny world: train, then the serving half (export, embed,
index, example searches) and the closing JSON line with the retrieval figures."""

import os

from conftest import TINY_CONFIG, last_json, run_launch


def test_demo_runs_training_and_serving_and_reports_retrieval(tmp_path):
  result = run_launch("demo", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}",
                      "--config.train.steps=4", "--config.eval.index_size=32",
                      "--config.eval.max_pairs=16")
  assert result.returncode == 0, result.stderr[-3000:]
  demo = last_json(result)["demo"]
  assert set(demo["recall@10"]) >= {"q2pin", "q2product", "q2query"}
  retrieval = demo["retrieval"]
  assert 0.0 <= retrieval["scann_recall@10"] <= 1.0
  assert retrieval["scann_qps"] > 0 and retrieval["exact_qps"] > 0
  assert set(retrieval["kinds"]) == {"pins", "products", "queries"}
  for kind in ("pins", "products", "queries"):
    assert os.path.isfile(tmp_path / "index" / kind / "index.json")
    assert os.listdir(tmp_path / "embeddings" / kind)
  assert os.path.isfile(tmp_path / "bundle" / "manifest.json")
  # The retrieval table and three example searches, each with a result line per entity type.
  assert "ScaNN index vs exact search" in result.stdout
  searches = [line for line in result.stdout.splitlines() if line.startswith("search '")]
  assert len(searches) == 3
  for kind in ("pins", "products", "queries"):
    assert sum(line.strip().startswith(kind) for line in result.stdout.splitlines()) >= 3
