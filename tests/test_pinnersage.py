"""PinnerSage (SPEC §4): Ward clustering vs SciPy on random inputs, medoids and importances vs
NumPy, the online pass vs a from-scratch reference, online + reconcile == batch, launch.py
pinnersage, HTTP, and the benchmark on a slice of MovieLens."""

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from omnisage.models import pinnersage as model
from omnisage.serving.index.scann_index import build_index, load_index
from omnisage.serving.pinnersage import batch as ps_batch
from omnisage.serving.pinnersage import service as ps
from tests.helpers import ROOT, last_json, run_launch, running, subprocess_env

JSON = {"content-type": "application/json"}
DAY = 86_400
T0 = 1_700_000_000


def scipy_labels(x, alpha):
  if len(x) == 1:
    return np.zeros(1, np.int32)
  return model.canonical(fcluster(linkage(np.asarray(x, np.float64), "ward"), alpha,
                                  criterion="distance"))


def same_partition(a, b) -> bool:
  """Equal up to a permutation of the labels: the same co-membership of every pair."""
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :]))
                                     .all())


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_ward_cut_equals_scipy_fcluster_distance(dim):
  """cluster_user's partition is fcluster(linkage(P, "ward"), alpha, "distance") on random inputs,
  at cuts spread over the merge heights (never within 1e-9 of one)."""
  rng = np.random.default_rng(dim)
  for n in [1, 2, 3, 7, 16, 33, 64, 100, 257]:
    for trial in range(3):
      x = rng.standard_normal((n, dim))
      if trial == 2 and n > 3:   # exact duplicates: ties at height 0
        x[rng.integers(0, n, n // 3)] = x[0]
      times = np.sort(rng.uniform(T0 - 90 * DAY, T0, n))
      heights = linkage(x, "ward")[:, 2] if n > 1 else np.zeros(1)
      alphas = [0.0] + [float(np.quantile(heights, q)) for q in (0.1, 0.4, 0.7, 0.95)] + [1e3]
      alphas = [a + 1e-6 if np.abs(heights - a).min() < 1e-9 else a for a in alphas]
      for alpha in alphas:
        got = model.cluster_user(x, times, T0, alpha).labels
        ref = scipy_labels(x, alpha)
        assert same_partition(got, ref), f"n={n} dim={dim} alpha={alpha}"
        np.testing.assert_array_equal(got, ref)   # and canonical: numbered by first member
  assert (model.ward_labels(rng.standard_normal((20, 3)), 1e6) == 0).all()


def test_ward_linkage_is_scipys_and_defers_to_scipy_on_tied_merges():
  """fastcluster's hierarchy is SciPy's (same merges, heights to rounding); where its heights
  repeat a positive value (tied candidate merges, e.g. lattice points) the linkage IS SciPy's."""
  import fastcluster
  from scipy.spatial.distance import pdist
  rng = np.random.default_rng(12)
  for n in (2, 3, 10, 100, 300):
    x = rng.standard_normal((n, 16))
    got, ref = model.ward_linkage(x), linkage(x, "ward")
    np.testing.assert_array_equal(got[:, [0, 1, 3]], ref[:, [0, 1, 3]])
    np.testing.assert_allclose(got[:, 2], ref[:, 2], rtol=1e-12)
  x = rng.integers(0, 3, (60, 3)).astype(np.float64)
  heights = fastcluster.linkage(pdist(x), method="ward")[:, 2]
  assert np.any((heights[1:] == heights[:-1]) & (heights[1:] > 0))   # the case under test
  np.testing.assert_array_equal(model.ward_linkage(x), linkage(x, "ward"))
  with pytest.raises(ValueError, match="overflow"):
    model.ward_linkage(np.asarray([[0.0, 1e300], [1e300, 0.0], [-1e300, 0.0]]))


def test_cut_count_is_number_of_heights_above_alpha():
  """fcluster 'distance' at alpha keeps the merges with height <= alpha: n - #merges clusters."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((40, 5))
  z = model.ward_linkage(x)
  heights = z[:, 2]
  assert (np.diff(heights) >= 0).all()
  for merges in (0, 1, 10, 25, 39):
    alpha = 0.0 if merges == 0 else float(heights[merges - 1] + heights[min(merges, 38)]) / 2
    if merges == 39:
      alpha = float(heights[-1]) + 1.0
    assert model.cut_linkage(z, 40, alpha).max() + 1 == 40 - merges


def test_numpy_nn_chain_equals_scipy():
  """The benchmark's side-by-side NumPy nearest-neighbour chain is the same clustering."""
  from benchmarks.pinnersage import nn_chain_numpy
  rng = np.random.default_rng(11)
  for n in (2, 5, 40, 150):
    x = rng.standard_normal((n, 8))
    heights = linkage(x, "ward")[:, 2]
    for alpha in (float(np.quantile(heights, 0.3)) + 1e-7, float(np.quantile(heights, 0.8)) + 1e-7):
      assert same_partition(nn_chain_numpy(x, alpha), scipy_labels(x, alpha))


def test_cluster_user_medoids_and_importances_vs_numpy():
  rng = np.random.default_rng(2)
  for n in (1, 5, 30, 64, 200):
    x = rng.standard_normal((n, 8))
    times = np.sort(rng.uniform(T0 - 90 * DAY, T0, n)).astype(np.int64)
    for lam in (0.0, 0.01, 0.1):
      c = model.cluster_user(x.astype(np.float32), times, T0, 3.0, lam)
      assert len(c.medoids) == len(c.importance) == len(c.sizes) == c.labels.max() + 1
      ages = (T0 - times) / DAY
      x64 = x.astype(np.float32).astype(np.float64)
      for k in range(c.labels.max() + 1):
        members = np.flatnonzero(c.labels == k)
        cost = [((x64[m] - x64[members]) ** 2).sum() for m in members]   # the paper's definition
        assert c.medoids[k] == members[int(np.argmin(cost))]
        assert c.sizes[k] == len(members)
        np.testing.assert_allclose(c.importance[k], np.exp(-lam * ages[members]).sum(),
                                   rtol=1e-12)


def test_medoid_ties_go_to_the_earliest_action():
  x = np.asarray([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
  labels = np.asarray([0, 0, 0, 0, 1, 1])
  # Cluster 0: items 1 and 2 are the same point, the centroid: the earlier one (1) is the medoid.
  np.testing.assert_array_equal(model.medoids(x, labels), [1, 4])


def test_cluster_user_bad_input():
  x = np.zeros((3, 4))
  t = np.asarray([1, 2, 3])
  with pytest.raises(ValueError, match="at least one"):
    model.cluster_user(np.zeros((0, 4)), np.zeros(0), 0, 1.0)
  with pytest.raises(ValueError, match="NaN"):
    model.cluster_user(np.full((3, 4), np.nan), t, 3, 1.0)
  with pytest.raises(ValueError, match="alpha"):
    model.cluster_user(x, t, 3, -1.0)
  with pytest.raises(ValueError, match="timestamps"):
    model.cluster_user(x, t[:2], 3, 1.0)
  with pytest.raises(ValueError, match=r"\[n, dim\]"):
    model.cluster_user(np.zeros(4), t, 3, 1.0)
  with pytest.raises(ValueError, match="lam"):
    model.cluster_user(x, t, 3, 1.0, lam=-0.1)


def online_reference(labels, old, new, alpha):
  """From scratch for every action: member lists, their means, Ward's 2n/(n+1)||p-c||^2."""
  members = {}
  for i, c in enumerate(labels):
    members.setdefault(int(c), []).append(old[i])
  out = list(labels)
  for p in new:
    best, best_d = None, np.inf
    for c, pts in members.items():
      n = len(pts)
      d = 2 * n / (n + 1) * float(((p - np.mean(pts, axis=0)) ** 2).sum())
      if d < best_d:
        best, best_d = c, d
    if best is not None and np.sqrt(best_d) <= alpha:
      members[best].append(p)
      out.append(best)
    else:
      members[len(members)] = [p]
      out.append(len(members) - 1)
  return np.asarray(out)


def test_online_assign_vs_reference():
  rng = np.random.default_rng(3)
  for n, m, alpha in [(0, 5, 1.5), (10, 10, 1.0), (40, 20, 2.5), (30, 15, 0.3)]:
    old = rng.standard_normal((n, 4))
    new = rng.standard_normal((m, 4))
    # Any canonical partition will do (no JAX here: the pass is NumPy).
    labels = model.canonical(rng.integers(0, max(n // 4, 1), n))
    got = model.online_assign(labels, old, new, alpha)
    np.testing.assert_array_equal(got, online_reference(labels, old, new, alpha))
    assert (got[:n] == labels).all()


# --- the batch job, the service, launch.py, HTTP ---------------------------------------------

def write_items(path, rng, n=300, dim=8, centres=6):
  """Unit vectors around a few centres: users' histories form real clusters."""
  centre = rng.standard_normal((centres, dim))
  x = centre[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  ids = [f"item{i}" for i in range(n)]
  pq.write_table(pa.table({"id": ids, "title": [f"Item {i}" for i in range(n)],
                           "embedding": pa.array(list(x.astype(np.float32)),
                                                 pa.list_(pa.float32(), dim))}), path)
  return ids, x.astype(np.float32)


def write_actions(path, rows):
  users, items, times = zip(*rows)
  pq.write_table(pa.table({"user_id": pa.array(users, pa.string()),
                           "item_id": pa.array(items, pa.string()),
                           "timestamp": pa.array(times, pa.int64())}), path)


def random_actions(rng, ids, users=12, start=T0 - 120 * DAY, end=T0):
  rows = []
  for u in range(users):
    for _ in range(rng.integers(1, 40)):
      rows.append((f"u{u}", ids[rng.integers(len(ids))], int(rng.integers(start, end))))
  return rows


def medoid_table(out):
  t = pq.read_table(os.path.join(out, "medoids.parquet")).to_pylist()
  return {(r["user_id"], r["cluster"]): (r["medoid_id"], r["importance"], r["size"]) for r in t}


def test_online_then_reconcile_equals_batch(tmp_path):
  rng = np.random.default_rng(4)
  items_path = str(tmp_path / "items.parquet")
  ids, _ = write_items(items_path, rng)
  old = random_actions(rng, ids)
  today = [(f"u{u}", ids[rng.integers(len(ids))], int(T0 + DAY + rng.integers(0, DAY)))
           for u in list(range(14)) * 3]   # users 12, 13 are new
  write_actions(tmp_path / "old.parquet", old)
  write_actions(tmp_path / "all.parquet", old + today)
  alpha = 0.9
  ps_batch.run_batch(items_path, str(tmp_path / "old.parquet"), str(tmp_path / "b0"), alpha=alpha,
               now=T0)
  service = ps.PinnerSageService.load(str(tmp_path / "b0"), items_path)
  before = {u: s.clusters.labels.copy() for u, s in service.states.items()}
  items = service.items
  for user in sorted({u for u, _, _ in today}):
    acts = [(i, t) for u, i, t in today if u == user]
    reply = service.update(user, acts, now=T0 + 2 * DAY)
    # The online pass itself: labels vs the from-scratch reference, importances at the new now.
    s = service.states[user]
    old_rows = s.rows[:len(s.rows) - len(acts)]
    expect = online_reference(before.get(user, np.zeros(0, int)), items.vectors[old_rows],
                              items.vectors[s.rows[len(old_rows):]], alpha)
    np.testing.assert_array_equal(s.clusters.labels, expect)
    ages = (T0 + 2 * DAY - s.times) / DAY
    np.testing.assert_allclose(s.clusters.importance,
                               np.bincount(expect, np.exp(-0.01 * ages)), rtol=1e-12)
    assert reply["added"] == len(acts) and reply["clusters"] == len(s.clusters.importance)
  service.reconcile(now=T0 + 2 * DAY)
  ps_batch.run_batch(items_path, str(tmp_path / "all.parquet"), str(tmp_path / "b1"), alpha=alpha,
               now=T0 + 2 * DAY)
  batch = medoid_table(tmp_path / "b1")
  online = {(u, c): (items.ids[s.rows[m]], w, n) for u, s in service.states.items()
            for c, (m, w, n) in enumerate(zip(s.clusters.medoids, s.clusters.importance,
                                               s.clusters.sizes))}
  assert online.keys() == batch.keys()
  for key, (medoid, w, n) in batch.items():
    assert online[key][0] == medoid and online[key][2] == n
    assert online[key][1] == pytest.approx(w, rel=1e-12)


def test_launch_pinnersage_end_to_end(tmp_path):
  rng = np.random.default_rng(5)
  items_path = str(tmp_path / "items.parquet")
  ids, _ = write_items(items_path, rng, n=50)
  rows = random_actions(rng, ids, users=5) + [("u0", "nope", T0 - DAY), ("u1", "nada", T0)]
  write_actions(tmp_path / "actions.parquet", rows)
  out = str(tmp_path / "out")
  result = run_launch("pinnersage", f"--item-embeddings={items_path}",
                      f"--actions={tmp_path / 'actions.parquet'}", f"--out={out}", "--alpha=0.8",
                      f"--now={T0}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["pinnersage"]
  in_window = sum(1 for _, i, t in rows if i in ids and t >= T0 - 90 * DAY)
  assert summary["rows_left_out"]["unknown_item"] == 2
  assert summary["rows_left_out"]["before_window"] == sum(
      1 for _, i, t in rows if i in ids and t < T0 - 90 * DAY)
  assert summary["actions_clustered"] == in_window and summary["actions"] == len(rows)
  medoids = pq.read_table(os.path.join(out, "medoids.parquet"))
  assert medoids.schema.names == ["user_id", "cluster", "medoid_id", "importance", "size"]
  assert str(medoids.schema.field("importance").type) == "double"
  assert sum(medoids.column("size").to_pylist()) == in_window
  assert set(medoids.column("medoid_id").to_pylist()) <= set(ids)
  members = pq.read_table(os.path.join(out, "members.parquet"))
  assert members.schema.names == ["user_id", "item_id", "timestamp", "cluster"]
  # Bad input: a missing column is exit 2 with the file and column named.
  pq.write_table(pa.table({"user_id": ["u"], "item_id": ["item1"]}), tmp_path / "bad.parquet")
  bad = run_launch("pinnersage", f"--item-embeddings={items_path}",
                   f"--actions={tmp_path / 'bad.parquet'}", f"--out={out}")
  assert bad.returncode == 2 and "timestamp" in bad.stdout + bad.stderr
  assert "bad.parquet" in bad.stdout + bad.stderr


def test_bad_inputs(tmp_path):
  rng = np.random.default_rng(6)
  items_path = str(tmp_path / "items.parquet")
  write_items(items_path, rng, n=20)
  with pytest.raises(FileNotFoundError, match="missing.parquet"):
    ps_batch.run_batch(items_path, str(tmp_path / "missing.parquet"), str(tmp_path / "o"))
  pq.write_table(pa.table({"user_id": ["u", None], "item_id": ["item1", "item2"],
                           "timestamp": pa.array([1, 2], pa.int64())}), tmp_path / "n.parquet")
  with pytest.raises(ValueError, match="'user_id' has 1 nulls"):
    ps_batch.run_batch(items_path, str(tmp_path / "n.parquet"), str(tmp_path / "o"))
  pq.write_table(pa.table({"id": ["a"]}), tmp_path / "e.parquet")
  with pytest.raises(ValueError, match=r"e.parquet: no column\(s\) \['embedding'\]"):
    ps_batch.read_items(str(tmp_path / "e.parquet"))


def test_http_update_and_recommend(tmp_path):
  rng = np.random.default_rng(7)
  ids, x = write_items(str(tmp_path / "items.parquet"), rng, n=400)
  # The embed.py directory format, indexed with ScaNN as in serving.
  os.makedirs(tmp_path / "emb" / "pins")
  pq.write_table(pa.table({"entity_index": pa.array(np.arange(400), pa.int32()), "id": ids,
                           "title": [f"Item {i}" for i in range(400)],
                           "embedding": pa.array(list(x), pa.list_(pa.float32(), 8))}),
                 tmp_path / "emb" / "pins" / "shard-00000.parquet")
  build_index(str(tmp_path / "emb"), str(tmp_path / "index"), qps_seconds=0.02,
              tune_queries_per_split=50)
  items = ps_batch.read_items(str(tmp_path / "emb"))
  service = ps.PinnerSageService(items, load_index(str(tmp_path / "index"))["pins"],
                                 alpha=0.8, clock=lambda: T0)
  with running(ps.create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as client:
    acts = [{"item_id": ids[i], "timestamp": T0 - i * 3600} for i in range(0, 60, 3)]
    r = client.post("/v1/pinnersage/update", json={"user_id": "u1", "actions": acts + [
        {"item_id": "unknown", "timestamp": T0}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == 20 and body["unknown_items"] == 1 and body["clusters"] >= 1
    assert sum(m["size"] for m in body["medoids"]) == 20
    r = client.post("/v1/pinnersage/recommend", json={"user_id": "u1", "k": 50, "seed": 0})
    assert r.status_code == 200, r.text
    got = r.json()
    cands = [c["id"] for c in got["candidates"]]
    assert len(cands) == 50 == len(set(cands))
    assert 1 <= len(got["medoids"]) <= 3
    # Same seed, same answer; the medoids' own nearest items come first.
    again = client.post("/v1/pinnersage/recommend", json={"user_id": "u1", "k": 50, "seed": 0})
    assert again.json() == got
    assert set(cands[:len(got["medoids"])]) == set(got["medoids"])
    r = client.post("/v1/pinnersage/recommend", json={"user_id": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "user_id"
    r = client.post("/v1/pinnersage/recommend", json={"user_id": "u1", "k": 401})
    assert r.status_code == 422 and r.json()["error"]["field"] == "k"
    r = client.post("/v1/pinnersage/update", json={"user_id": "u1", "actions": [
        {"item_id": ids[0]}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "actions[0].timestamp"
    r = client.post("/v1/pinnersage/update", content=b"{", headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"


# --- benchmarks/pinnersage.py on a slice of MovieLens ------------------------------------------

DATASETS = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))


def test_benchmark_on_a_slice():
  """Both embedding sets on 40 users: PPMI-SVD, and the tiny two-tower config trained 8 steps on
  the validation histories (then the same epochs on the full histories for the test split)."""
  if not os.path.isdir(os.path.join(DATASETS, "movielens-latest-small")):
    pytest.skip(f"{DATASETS}/movielens-latest-small not found (../shared/datasets)")
  result = subprocess.run(
      [sys.executable, "benchmarks/pinnersage.py", f"--datasets={DATASETS}", "--max-users=40",
       "--lengths", "128", "--speed-scale=0.2", "--speed-repeats=1", "--seeds=2",
       "--kmeans-ks", "3", "5", "--embeddings", "ppmi_svd,two_tower", "--twotower-tiny",
       "--twotower-steps=8"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])["pinnersage"]
  assert out["embeddings"] == ["ppmi_svd", "two_tower"]
  methods = {"last", "average", "decayed_average", "kmeans", "ward_centroid", "ward_medoid_all",
             "ward_medoid_l0", "ward_medoid_l0.01", "ward_medoid_l0.1"}
  # The two-tower item tower: every catalogue movie embedded (no test item is unembedded), one
  # model per stage, the test stage as many epochs on the longer full histories.
  tt = out["protocol_two_tower"]
  assert tt["users"] == 40 and tt["left_out"]["users_without_embedded_history"] == 0
  assert tt["left_out"]["test_items_without_embedding"].startswith("0 of ")
  assert tt["two_tower"]["steps"]["validation"] == 8
  assert tt["two_tower"]["steps"]["test"] >= 8
  assert tt["kmeans_k"] in (3, 5) and tt["alpha"] in {float(a) for a in tt["validation"]["alpha"]}
  for targets in ("all", "next"):
    assert set(tt["recall"][targets]) == methods
    for mean, se in tt["recall"][targets].values():
      assert np.isfinite(mean) and np.isfinite(se) and 0.0 <= mean <= 1.0
    assert tt["lift_vs_last"][targets]["last"] == [0.0, 0.0]
  assert "=== item embeddings: two_tower" in result.stdout
  p = out["protocol"]
  assert p["users"] + p["left_out"]["users_without_embedded_history"] == 40
  for targets in ("all", "next"):
    assert set(p["recall"][targets]) == methods
    for mean, se in p["recall"][targets].values():
      assert 0.0 <= mean <= 1.0 and se > 0.0
    assert p["lift_vs_last"][targets]["last"] == [0.0, 0.0]
  # The choices come from validation: alpha is interior to its (widened) grid or at a limit.
  grid = sorted(float(a) for a in p["validation"]["alpha"])
  scores = {float(a): v for a, v in p["validation"]["alpha"].items()}
  assert p["alpha"] == max(grid, key=lambda a: (scores[a]["recall"], -a))
  # An edge is chosen only after the grid was widened past it to a limit.
  assert p["alpha"] != grid[-1] or scores[grid[-1]]["clusters_per_user"] == 1.0
  assert p["alpha"] != grid[0] or grid[0] < 0.3
  assert p["kmeans_k"] in (3, 5)
  assert sum(b["users"] for b in p["by_diversity"].values()) <= p["users"]
  assert set(out["ward_speed_vs_scipy"]) == {"128"} and out["ward_speed_vs_scipy"]["128"] > 0
  assert out["whole_job"]["users"] == 40
  assert "| method |" in result.stdout   # the tables
