"""PinnerSage's batch job on Ray Data (issue 19; serving/pinnersage/ray_job.py) over a real
two-node Ray cluster (tests/conftest.py `ray_cluster`): medoids.parquet and members.parquet equal
to the in-process run_batch's, table for table, on a synthetic input that covers every rule of the
window (always runs) and on MovieLens (skipped when the dataset is absent); and
`launch.py train --config.engine=ray` from a child process."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage.serving.pinnersage import batch as ps_batch
from omnisage.serving.pinnersage import ray_job
from tests.helpers import ROOT, last_json, run_launch

DAY = 86_400
T0 = 1_700_000_000
DATASETS = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))
TIMING = ("cluster_seconds", "users_per_s", "seconds")
RAY_ONLY = ("engine", "ray_address", "workers", "ray_init_seconds", "cluster_resources")


def write_items(path, ids, dim, seed):
  """Unit vectors around a few centres (real clusters) for `ids`."""
  rng = np.random.default_rng(seed)
  centre = rng.standard_normal((5, dim))
  x = centre[rng.integers(0, 5, len(ids))] + 0.4 * rng.standard_normal((len(ids), dim))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  pq.write_table(pa.table({"id": pa.array(ids, pa.string()),
                           "embedding": pa.array(list(x), pa.list_(pa.float32(), dim))}), path)


def write_actions(path, users, items, times):
  pq.write_table(pa.table({"user_id": pa.array(users, pa.string()),
                           "item_id": pa.array(items, pa.string()),
                           "timestamp": pa.array(times, pa.int64())}), path)


def assert_same_job(local_dir, ray_dir, local, on_ray):
  """Both files equal (schema, rows, order, values) and the summaries equal but for timings."""
  for name in ("medoids.parquet", "members.parquet"):
    want = pq.read_table(os.path.join(local_dir, name))
    got = pq.read_table(os.path.join(ray_dir, name))
    assert got.schema.equals(want.schema, check_metadata=True), name
    assert got.num_rows == want.num_rows and got.num_rows > 0, name
    assert got.equals(want), name
  assert on_ray["engine"] == "ray" and on_ray["workers"] >= 1
  drop = lambda s: {k: v for k, v in s.items() if k not in TIMING + RAY_ONLY + ("out",)}  # noqa: E731
  assert drop(on_ray) == drop(local)
  with open(os.path.join(ray_dir, "summary.json")) as f:
    assert json.load(f)["users"] == local["users"]


def test_synthetic_input_writes_the_files_of_the_local_job(ray_cluster, tmp_path):
  rng = np.random.default_rng(0)
  ids = [f"item{i}" for i in range(120)]
  items_path = str(tmp_path / "items.parquet")
  write_items(items_path, ids, dim=8, seed=1)
  # Users whose ids sort differently as bytes and as numbers, one non-ASCII; every rule of the
  # window: unknown items, rows before the window and after now, histories over max_history,
  # tied timestamps (ties go by item id), repeated items (medoid ties: earliest action).
  users, items, times = [], [], []
  for u, name in enumerate(["u10", "u2", "u1", "ü", "U3", "u0", "long", "tied"]):
    n = {"long": 60, "tied": 12}.get(name, int(rng.integers(1, 30)))
    users += [name] * n
    items += [ids[int(rng.integers(0, 40 if u % 2 else 120))] for _ in range(n)]
    times += [T0 - 5 * DAY if name == "tied" else
              int(rng.integers(T0 - 120 * DAY, T0 + 3 * DAY)) for _ in range(n)]
  users += ["u0", "u1", "ghost", "u2"]   # "ghost" has only an unknown item: no clusters at all
  items += ["nope", "nada", "nope", ids[0]]
  times += [T0 - DAY, T0 - DAY, T0 - DAY, T0 + DAY]   # the last one: after now
  order = rng.permutation(len(users))   # the input's row order must not matter
  actions = str(tmp_path / "actions.parquet")
  write_actions(actions, [users[i] for i in order], [items[i] for i in order],
                [times[i] for i in order])
  args = dict(alpha=0.9, now=T0, max_history=25)
  local = ps_batch.run_batch(items_path, actions, str(tmp_path / "local"), **args)
  on_ray = ray_job.run_batch_on_ray(items_path, actions, str(tmp_path / "ray"), workers=2,
                                    **args)
  left_out = local["rows_left_out"]
  assert min(left_out.values()) > 0   # every rule did fire
  assert on_ray["workers"] == 2
  assert_same_job(tmp_path / "local", tmp_path / "ray", local, on_ray)


def test_movielens_writes_the_files_of_the_local_job(ray_cluster, tmp_path):
  path = os.path.join(DATASETS, "movielens-latest-small")
  if not os.path.isdir(path):
    pytest.skip(f"{path} not found (../shared/datasets)")
  from omnisage.data.sources import movielens
  ratings = movielens.load(path).ratings
  movies = np.unique(ratings["movie"].to_numpy())
  items_path = str(tmp_path / "items.parquet")
  write_items(items_path, [str(m) for m in movies], dim=16, seed=2)
  actions = str(tmp_path / "actions.parquet")
  write_actions(actions, ratings["user"].to_numpy().astype(str),
                ratings["movie"].to_numpy().astype(str),
                ratings["timestamp"].to_numpy().astype(np.int64))
  # Every user's whole history (MovieLens spans 22 years), the longest cut to keep this fast.
  args = dict(alpha=1.4, window_days=1e5, max_history=300)
  local = ps_batch.run_batch(items_path, actions, str(tmp_path / "local"), **args)
  on_ray = ray_job.run_batch_on_ray(items_path, actions, str(tmp_path / "ray"), **args)
  assert local["users"] == 610 and local["rows_left_out"]["over_max_history"] > 0
  assert_same_job(tmp_path / "local", tmp_path / "ray", local, on_ray)


def test_launch_train_engine_ray(ray_cluster, tmp_path):
  ids = [f"item{i}" for i in range(40)]
  items_path = str(tmp_path / "items.parquet")
  write_items(items_path, ids, dim=8, seed=3)
  rng = np.random.default_rng(4)
  n = 90
  actions = str(tmp_path / "actions.parquet")
  write_actions(actions, [f"u{i}" for i in rng.integers(0, 6, n)],
                [ids[i] for i in rng.integers(0, 40, n)],
                rng.integers(T0 - 30 * DAY, T0, n).tolist())
  config = os.path.join(ROOT, "configs", "pinnersage_movielens.py")
  common = (f"--config={config}", f"--config.item_embeddings={items_path}",
            f"--config.actions={actions}", "--config.alpha=0.9")
  runs = {}
  for engine in ("local", "ray"):
    flags = [f"--workdir={tmp_path / engine}", f"--config.engine={engine}"]
    if engine == "ray":
      flags.append(f"--config.ray_address={ray_cluster.address}")
    result = run_launch("train", *common, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    runs[engine] = last_json(result)["train"]
  assert runs["local"]["engine"] == "local" and runs["ray"]["engine"] == "ray"
  assert runs["ray"]["ray_address"] == ray_cluster.address
  for name in ("medoids.parquet", "members.parquet"):
    assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name))
  bad = run_launch("train", *common, f"--workdir={tmp_path / 'bad'}", "--config.engine=spark")
  assert bad.returncode == 2 and "config.engine must be one of" in bad.stdout + bad.stderr


def test_bad_arguments_and_an_empty_window_need_no_ray(tmp_path):
  with pytest.raises(ValueError, match="ray_workers must be >= 0"):
    ray_job.run_batch_on_ray("items", "actions", str(tmp_path), workers=-1)
  with pytest.raises(FileNotFoundError):
    ray_job.run_batch_on_ray(str(tmp_path / "missing.parquet"), "actions", str(tmp_path))
  # No action in the window: both engines write the same empty files; Ray is never started.
  items_path = str(tmp_path / "items.parquet")
  write_items(items_path, ["a", "b"], dim=4, seed=5)
  actions = str(tmp_path / "actions.parquet")
  write_actions(actions, ["u", "v"], ["a", "zzz"], [T0 - 200 * DAY, T0])
  local = ps_batch.run_batch(items_path, actions, str(tmp_path / "local"), now=T0)
  on_ray = ray_job.run_batch_on_ray(items_path, actions, str(tmp_path / "ray"), now=T0)
  assert on_ray["users"] == local["users"] == 0 and on_ray["workers"] == 0
  assert on_ray["rows_left_out"] == local["rows_left_out"]
  for name in ("medoids.parquet", "members.parquet"):
    assert pq.read_table(tmp_path / "ray" / name).equals(pq.read_table(tmp_path / "local" / name))
