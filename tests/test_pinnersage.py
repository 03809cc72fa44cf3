"""PinnerSage (SPEC §4): Ward clustering vs scipy, medoids and importances vs NumPy, the online
pass vs a from-scratch reference, online + reconcile == batch, launch.py pinnersage, HTTP."""

import os

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
from tests.helpers import last_json, run_launch, running

JSON = {"content-type": "application/json"}
DAY = 86_400
T0 = 1_700_000_000


def padded(rng, sizes, dim):
  points = np.zeros((len(sizes), max(sizes), dim), np.float32)
  mask = np.zeros((len(sizes), max(sizes)), bool)
  for b, n in enumerate(sizes):
    points[b, :n] = rng.standard_normal((n, dim))
    mask[b, :n] = True
  return points, mask


def scipy_labels(x, alpha):
  if len(x) == 1:
    return np.zeros(1, np.int32)
  return model.canonical(fcluster(linkage(x.astype(np.float64), "ward"), alpha,
                                  criterion="distance")[None])[0]


@pytest.mark.parametrize("dim", [2, 16])
def test_ward_cut_equals_scipy_fcluster_distance(dim):
  rng = np.random.default_rng(dim)
  sizes = [1, 2, 3, 7, 16, 33, 64, 100]
  points, mask = padded(rng, sizes, dim)
  heights = np.concatenate([linkage(points[b, :n].astype(np.float64), "ward")[:, 2]
                            for b, n in enumerate(sizes) if n > 1])
  # Cuts between heights (never within 1e-3 of one: float32 vs float64 round-off).
  alphas = [0.0] + [float(np.quantile(heights, q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)] + [1e3]
  alphas = [a + 2e-3 if np.abs(heights - a).min() < 1e-3 else a for a in alphas]
  for alpha in alphas:
    labels = model.ward_labels(points, mask, alpha)
    for b, n in enumerate(sizes):
      np.testing.assert_array_equal(labels[b, :n], scipy_labels(points[b, :n], alpha),
                                    err_msg=f"alpha {alpha} user {b} (n={n})")
      assert (labels[b, n:] == -1).all()
  # The two ends: singletons at alpha 0 (no ties), one cluster above every height.
  assert (model.ward_labels(points, mask, 0.0)[mask] == np.concatenate(
      [np.arange(n) for n in sizes])).all()
  assert (model.ward_labels(points, mask, 1e3)[mask] == 0).all()


def test_cut_count_is_number_of_heights_above_alpha():
  """fcluster 'distance' at alpha keeps the merges with height <= alpha: n - #merges clusters."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((40, 5)).astype(np.float32)
  heights = linkage(x.astype(np.float64), "ward")[:, 2]
  for merges in (0, 1, 10, 25, 39):
    alpha = 0.0 if merges == 0 else float(heights[merges - 1] + heights[min(merges, 38)]) / 2
    if merges == 39:
      alpha = float(heights[-1]) + 1.0
    labels = model.ward_labels(x[None], np.ones((1, 40), bool), alpha)[0]
    assert labels.max() + 1 == 40 - merges


def test_medoids_and_importances_vs_numpy():
  rng = np.random.default_rng(2)
  sizes = [1, 5, 30, 64]
  points, mask = padded(rng, sizes, 8)
  labels = model.ward_labels(points, mask, 3.0)
  medoids = model.medoids(points, labels)
  ages = rng.uniform(0, 90, mask.shape)
  for lam in (0.0, 0.01, 0.1):
    imps = model.importances(labels, ages, lam)
    for b, n in enumerate(sizes):
      x = points[b, :n].astype(np.float64)
      for c in range(labels[b, :n].max() + 1):
        members = np.flatnonzero(labels[b, :n] == c)
        cost = [((x[m] - x[members]) ** 2).sum() for m in members]
        assert medoids[b, c] == members[int(np.argmin(cost))]
        np.testing.assert_allclose(imps[b][c], np.exp(-lam * ages[b, members]).sum(), rtol=1e-12)
      assert (medoids[b, labels[b, :n].max() + 1:] == -1).all()


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
    labels = model.canonical(rng.integers(0, max(n // 4, 1), (1, n)))[0]
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
