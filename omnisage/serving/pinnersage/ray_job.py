"""PinnerSage's daily batch job on Ray Data: batch.py's `run_batch`, one Ray group per user.

PinnerSage (Pal et al., KDD 2020; SPEC §4) re-clusters every user's last 90 days daily; at
Pinterest that job runs on Ray. This is `launch.py train --config=configs/pinnersage_movielens.py
--config.engine=ray` (docs/scale_out.md), and it writes the files of the in-process job, row for
row and value for value:

  driver   reads and checks the item embeddings and the actions exactly as run_batch does (same
           errors), keeps the actions of the window whose item has an embedding (the same
           `rows_left_out` counts), and puts the item vectors in the object store ONCE.
  groups   `groupby("user_id").map_groups(cluster_group)`: one group per user, on at most
           `workers` concurrent tasks. Each worker process maps the vectors from its node's
           object store once (a zero-copy read-only view, cached across the tasks it runs), then
           per user (`ClusterUsers`) sorts the history exactly as batch.window_histories
           does (time, then item id), keeps the `max_history` most recent actions and calls
           `omnisage.models.pinnersage.cluster_user` on them, the per-user function of the
           local job. It returns one row per action (the dropped ones with cluster -1), each
           carrying its cluster's importance and size and whether it is the cluster's medoid.
  output   the driver collects those rows (a few per action: small next to the O(N^2) work),
           sorts them by user and position and writes <out>/medoids.parquet, members.parquet
           and summary.json with the local job's columns and types (batch.py's docstring).

Usage: `summary = run_batch_on_ray("runs/tt/embeddings", "actions.parquet", "runs/ps")`.
"""

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnisage.data.ray_runtime import init_ray
from omnisage.models import pinnersage as model
from omnisage.serving.pinnersage.batch import DEFAULTS, read_actions, read_items


class ClusterUsers:
  """One user's group -> its rows, clustered (the per-group function; Ray-free, so testable)."""

  def __init__(self, vectors: np.ndarray, now: int, alpha: float, lam: float,
               max_history: int):
    self.vectors = vectors
    self.now, self.alpha, self.lam, self.max_history = now, alpha, lam, max_history

  def __call__(self, group: dict) -> dict:
    rows = np.asarray(group["row"], np.int64)
    items = np.asarray(group["item_id"]).astype(str)
    times = np.asarray(group["timestamp"], np.int64)
    # batch.window_histories' order (time, then item id, then row): the medoid ties and the
    # canonical labels follow it, so both engines cluster the same sequence.
    order = np.lexsort((rows, items, times))
    n = len(order)
    dropped = max(0, n - self.max_history)
    kept = order[dropped:]
    c = model.cluster_user(self.vectors[rows[kept]], times[kept], now=self.now, alpha=self.alpha,
                           lam=self.lam)
    cluster = np.full(n, -1, np.int32)
    cluster[dropped:] = c.labels
    medoid = np.zeros(n, bool)
    medoid[dropped + c.medoids] = True
    position = np.arange(n, dtype=np.int32) - dropped   # negative: left out (max_history)
    importance = np.full(n, np.nan)
    importance[dropped:] = c.importance[c.labels]
    size = np.zeros(n, np.int32)
    size[dropped:] = c.sizes[c.labels]
    return {"user_id": np.asarray(group["user_id"])[order], "item_id": items[order],
            "timestamp": times[order], "position": position, "cluster": cluster,
            "medoid": medoid, "importance": importance, "size": size}


# Per worker process: the ClusterUsers of the job's vectors ObjectRef. Ray reuses a worker
# process for the job's tasks, so each process maps the vectors once (zero-copy from its node's
# object store, which fetched them once), not once per task.
_WORKERS: dict = {}


def cluster_group(group: dict, vectors_ref, now: int, alpha: float, lam: float,
                  max_history: int) -> dict:
  """The map_groups task function: ClusterUsers of the broadcast vectors on one user's group."""
  import ray
  key = (vectors_ref.hex(), now, alpha, lam, max_history)
  if key not in _WORKERS:
    _WORKERS.clear()   # another job's vectors: let them go
    _WORKERS[key] = ClusterUsers(ray.get(vectors_ref), now, alpha, lam, max_history)
  return _WORKERS[key](group)


def window_rows(items, users, item_ids, times, now: int, window_days: float) -> tuple:
  """(pa.Table user_id, item_id, row, timestamp of the window's actions, counts left out):
  batch.window_histories' filter and counts, before its per-user max_history cut."""
  item_ids = np.asarray(item_ids, object)
  rows = np.asarray([items.row.get(i, -1) for i in item_ids], np.int64)
  times = np.asarray(times, np.int64)
  start = now - window_days * model.DAY_S
  known = rows >= 0
  counts = {"unknown_item": int((~known).sum()),
            "before_window": int((known & (times < start)).sum()),
            "after_now": int((known & (times > now)).sum()), "over_max_history": 0}
  keep = known & (times >= start) & (times <= now)
  table = pa.table({"user_id": pa.array(np.asarray(users, object)[keep], pa.string()),
                    "item_id": pa.array(item_ids[keep], pa.string()),
                    "row": pa.array(rows[keep], pa.int64()),
                    "timestamp": pa.array(times[keep], pa.int64())})
  return table, counts


def cluster_on_ray(table: pa.Table, vectors: np.ndarray, now: int, alpha: float, lam: float,
                   max_history: int, workers: int, partitions: int) -> pa.Table:
  """ClusterUsers over every user's group of `table`; the rows the tasks return, unsorted."""
  import ray
  import ray.data
  vectors_ref = ray.put(vectors)   # once: each node's object store fetches it once
  ds = ray.data.from_arrow(table)
  # Tasks, not an actor pool: a pool of one actor per CPU holds every CPU from the start, and
  # the group-by's shuffle tasks, which must run first, then never get one (a deadlock on a
  # small cluster). A task holds its CPU only while it runs.
  out = ds.groupby("user_id", num_partitions=partitions).map_groups(
      cluster_group, batch_format="numpy",
      fn_args=(vectors_ref, now, alpha, lam, max_history),
      compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1)
  parts = [t for t in ray.get(out.to_arrow_refs()) if t.num_rows]
  return pa.concat_tables(parts) if parts else None


def write_outputs(rows: pa.Table | None, out: str) -> tuple[int, int]:
  """<out>/medoids.parquet and members.parquet (batch.write_states' columns, types and order)
  from ClusterUsers' rows; returns (users, clusters)."""
  os.makedirs(out, exist_ok=True)
  if rows is None:
    rows = pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
                     "timestamp": pa.array([], pa.int64()), "position": pa.array([], pa.int32()),
                     "cluster": pa.array([], pa.int32()), "medoid": pa.array([], pa.bool_()),
                     "importance": pa.array([], pa.float64()), "size": pa.array([], pa.int32())})
  # pyarrow orders strings by their UTF-8 bytes, i.e. by code point: Python's sorted(users).
  members = rows.filter(pc.greater_equal(rows["position"], 0)).sort_by(
      [("user_id", "ascending"), ("position", "ascending")])
  medoids = rows.filter(rows["medoid"]).sort_by(
      [("user_id", "ascending"), ("cluster", "ascending")])
  pq.write_table(pa.table({"user_id": medoids["user_id"].cast(pa.string()),
                           "cluster": medoids["cluster"].cast(pa.int32()),
                           "medoid_id": medoids["item_id"].cast(pa.string()),
                           "importance": medoids["importance"].cast(pa.float64()),
                           "size": medoids["size"].cast(pa.int32())}),
                 os.path.join(out, "medoids.parquet"))
  pq.write_table(pa.table({"user_id": members["user_id"].cast(pa.string()),
                           "item_id": members["item_id"].cast(pa.string()),
                           "timestamp": members["timestamp"].cast(pa.int64()),
                           "cluster": members["cluster"].cast(pa.int32())}),
                 os.path.join(out, "members.parquet"))
  return len(pc.unique(members["user_id"])), medoids.num_rows


def run_batch_on_ray(item_embeddings: str, actions: str, out: str,
                     alpha: float = DEFAULTS["alpha"], lam: float = DEFAULTS["lam"],
                     window_days: float = DEFAULTS["window_days"], now: int | None = None,
                     max_history: int = DEFAULTS["max_history"], kind: str | None = None,
                     address: str | None = None, workers: int = 0) -> dict:
  """batch.run_batch on Ray Data: the same files and summary keys, plus engine, ray_address,
  workers, ray_init_seconds and cluster_resources.

  address: the Ray cluster (host:port, "auto"); None: a local instance in this process, or the
  one this process already joined. workers: concurrent tasks; 0: one per CPU of the cluster.
  """
  t0 = time.time()
  if alpha < 0 or lam < 0 or window_days <= 0 or max_history < 1:
    raise ValueError(f"need alpha >= 0, lambda >= 0, window_days > 0, max_history >= 1; got "
                     f"{alpha}, {lam}, {window_days}, {max_history}")
  if workers < 0:
    raise ValueError(f"config.ray_workers must be >= 0 (0: one per CPU), got {workers}")
  items = read_items(item_embeddings, kind)
  users, item_ids, times = read_actions(actions)
  if not len(times):
    raise ValueError(f"{actions}: no actions")
  now = int(times.max()) if now is None else int(now)
  table, dropped = window_rows(items, users, item_ids, times, now, window_days)
  n_users = len(pc.unique(table["user_id"]))
  rows, resources, init_s, cluster_s = None, {}, 0.0, 0.0
  if n_users:   # else nothing to cluster: Ray is not even started
    t1 = time.time()
    resources = init_ray(address)
    init_s = time.time() - t1
    workers = max(1, min(workers or int(resources.get("CPU", 1)), n_users))
    t2 = time.time()
    # About four blocks of users per worker: few tasks, and a slow block is not the whole job.
    rows = cluster_on_ray(table, items.vectors, now, alpha, lam, max_history, workers,
                          partitions=min(n_users, 4 * workers))
    cluster_s = time.time() - t2
  if rows is not None:
    dropped["over_max_history"] = int(pc.sum(pc.less(rows["position"], 0)).as_py() or 0)
  n_users, n_clusters = write_outputs(rows, out)
  counts = (np.asarray([], np.int64) if rows is None else
            np.asarray(pc.value_counts(rows.filter(rows["medoid"])["user_id"]).field(
                "counts").to_numpy(zero_copy_only=False)))
  summary = {"out": out, "users": n_users, "actions": int(len(times)),
             "actions_clustered": int(table.num_rows - dropped["over_max_history"]),
             "rows_left_out": dropped, "clusters": n_clusters,
             "clusters_per_user": {"mean": round(float(np.mean(counts)), 2) if n_users else 0.0,
                                   "max": int(counts.max()) if n_users else 0},
             "alpha": alpha, "lambda": lam, "window_days": window_days, "now": now,
             "items": len(items.ids), "dim": int(items.vectors.shape[1]),
             "cluster_seconds": round(cluster_s, 3),
             "users_per_s": round(n_users / max(cluster_s, 1e-9), 1),
             "seconds": round(time.time() - t0, 2),
             "engine": "ray", "ray_address": address, "workers": workers if n_users else 0,
             "ray_init_seconds": round(init_s, 2), "cluster_resources": resources}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def train_on_ray(config, workdir: str) -> dict:
  """batch.train with config.engine="ray": the same config fields, plus ray_address and
  ray_workers (configs/pinnersage_movielens.py)."""
  if not config.actions:
    raise ValueError("config.actions is required: a Parquet file of user_id, item_id, timestamp "
                     "(--config.actions=PATH)")
  return run_batch_on_ray(config.item_embeddings, config.actions, workdir, alpha=config.alpha,
                          lam=config.lam, window_days=config.window_days, now=config.now,
                          max_history=config.max_history, kind=config.item_kind,
                          address=config.get("ray_address"),
                          workers=config.get("ray_workers", 0))
