"""PinnerSage's daily batch job (SPEC §4): users' recent actions -> Ward clusters -> medoids.

PinnerSage (Pal et al., KDD 2020) recomputes every user's clusters daily over the last 90 days.
`run_batch` (`launch.py train --config=configs/pinnersage_movielens.py`): every user's actions of
the last `window_days` (90) before `now` are clustered with Ward, cut at alpha, one user at a time
(`omnisage.models.pinnersage.cluster_user`: O(N^2) per user, the per-group function a Ray Data
job can call as it is); each cluster becomes its medoid and an importance
sum_i exp(-lambda * age_days_i) (lambda 0.01). Output:

  <out>/medoids.parquet  user_id string, cluster int32, medoid_id string, importance float64,
                         size int32 (one row per cluster; clusters in order of first action)
  <out>/members.parquet  user_id string, item_id string, timestamp int64, cluster int32 (the
                         actions clustered: the online pass continues from them)
  <out>/summary.json     the returned summary (counts, parameters, users/s)

Input rows are never dropped silently: rows whose item has no embedding, rows older than the
window and rows after `now` are counted in the summary; null fields are an error.

Usage: `summary = run_batch("runs/tt/embeddings", "actions.parquet", "runs/ps", alpha=0.8)`.
"""

import dataclasses
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnisage.models import pinnersage as model
from omnisage.serving.index.scann_index import read_embeddings

DEFAULTS = dict(
    alpha=1.4,          # Ward cut height, in embedding units (unit-norm embeddings); MovieLens
                        # validation's choice per embedding: docs/pinnersage.md
    lam=0.01,           # importance decay per day (SPEC §4)
    window_days=90.0,   # the batch job's history window (SPEC §4)
    max_history=4096,   # most recent actions kept per user (bounds the O(n^2) time and memory)
)


ACTION_COLUMNS = ("user_id", "item_id", "timestamp")


@dataclasses.dataclass
class Items:
  """Item embeddings: ids, float32 vectors, titles, id -> row."""
  ids: list[str]
  vectors: np.ndarray
  titles: list[str]
  row: dict

  @classmethod
  def create(cls, ids, vectors, titles=None):
    ids = [str(i) for i in ids]
    row = {}
    for r, i in enumerate(ids):
      row.setdefault(i, r)
    if len(row) != len(ids):
      raise ValueError(f"item embeddings: {len(ids) - len(row)} repeated ids")
    return cls(ids, np.asarray(vectors, np.float32), list(titles or ids), row)


def read_items(path: str, kind: str | None = None) -> Items:
  """A directory of <kind>/shard-*.parquet (launch.py embed; `kind`, or the one non-query kind),
  or one Parquet file with columns id and embedding (list or fixed_size_list of floats)."""
  if os.path.isdir(path):
    kinds = sorted(k for k in os.listdir(path) if os.path.isdir(os.path.join(path, k))
                   and k != "queries")
    if kind is None and len(kinds) != 1:
      raise ValueError(f"{path}: expected one item kind directory (pins/ or products/), found "
                       f"{kinds or 'none'}")
    data = read_embeddings(os.path.join(path, kind or kinds[0]))
    return Items.create(data.ids, data.vectors, data.titles)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: item embeddings not found (a directory from launch.py "
                            "embed, or a Parquet file with id, embedding)")
  table = read_parquet(path)
  missing = [c for c in ("id", "embedding") if c not in table.column_names]
  if missing:
    raise ValueError(f"{path}: no column(s) {missing} (have {table.column_names})")
  column = table.column("embedding").combine_chunks()
  if column.null_count or table.column("id").null_count:
    raise ValueError(f"{path}: null ids or embeddings")
  lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
  if len(lengths) == 0 or (lengths != lengths[0]).any():
    raise ValueError(f"{path}: embeddings must all have the same length")
  vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
  vectors = vectors.reshape(len(table), int(lengths[0]))
  if not np.isfinite(vectors).all():
    raise ValueError(f"{path}: embeddings contain NaN or infinity")
  titles = table.column("title").to_pylist() if "title" in table.column_names else None
  return Items.create(table.column("id").to_pylist(), vectors, titles)


def read_parquet(path: str) -> pa.Table:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  try:
    return pq.read_table(path)
  except (OSError, pa.ArrowException) as error:
    raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def read_actions(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user_id str [n], item_id str [n], timestamp int64 [n]) of an actions Parquet file."""
  table = read_parquet(path)
  missing = [c for c in ACTION_COLUMNS if c not in table.column_names]
  if missing:
    raise ValueError(f"{path}: no column(s) {missing} (have {table.column_names}; need "
                     f"{list(ACTION_COLUMNS)})")
  for name in ACTION_COLUMNS:
    if table.column(name).null_count:
      raise ValueError(f"{path}: column {name!r} has {table.column(name).null_count} nulls")
  if not pa.types.is_integer(table.schema.field("timestamp").type):
    raise ValueError(f"{path}: column 'timestamp' must be integer unix seconds, got "
                     f"{table.schema.field('timestamp').type}")
  users = np.asarray(table.column("user_id").cast(pa.string()).to_pylist(), object)
  items = np.asarray(table.column("item_id").cast(pa.string()).to_pylist(), object)
  return users, items, table.column("timestamp").to_numpy().astype(np.int64)


@dataclasses.dataclass
class UserState:
  """One user's clustered actions (time order) and cluster summaries."""
  rows: np.ndarray        # int64 [n] item rows
  times: np.ndarray       # int64 [n] unix seconds
  clusters: model.Clusters
  now: int


def _ages(times: np.ndarray, now: int) -> np.ndarray:
  return (now - np.asarray(times, np.float64)) / model.DAY_S


def cluster_users(items: Items, histories: dict, now: int, alpha: float, lam: float,
                  labels: dict | None = None) -> dict:
  """user -> UserState for {user: (rows, times)} (time-ordered); `labels` skips Ward (online)."""
  users = list(histories)
  found = model.cluster_histories(
      items.vectors, [histories[u][0] for u in users],
      [_ages(histories[u][1], now) for u in users], alpha, lam,
      None if labels is None else [labels[u] for u in users])
  return {u: UserState(histories[u][0], histories[u][1], c, now) for u, c in zip(users, found)}


def window_histories(items: Items, users, item_ids, times, now: int, window_days: float,
                     max_history: int) -> tuple[dict, dict]:
  """({user: (rows, times)} of the window, counts of the rows left out and why)."""
  users, item_ids, times = np.asarray(users, object), np.asarray(item_ids, object), \
      np.asarray(times, np.int64)
  rows = np.asarray([items.row.get(i, -1) for i in item_ids], np.int64)
  start = now - window_days * model.DAY_S
  counts = {"unknown_item": int((rows < 0).sum()),
            "before_window": int(((rows >= 0) & (times < start)).sum()),
            "after_now": int(((rows >= 0) & (times > now)).sum()), "over_max_history": 0}
  keep = (rows >= 0) & (times >= start) & (times <= now)
  users, rows, times, item_ids = users[keep], rows[keep], times[keep], item_ids[keep]
  # Time order, ties by item id then row: the clustering (and its medoid ties) is deterministic.
  order = np.lexsort((rows, item_ids.astype(str), times, users.astype(str)))
  histories = {}
  if len(order):
    users, rows, times = users[order], rows[order], times[order]
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
      lo_kept = max(lo, hi - max_history)
      counts["over_max_history"] += int(lo_kept - lo)
      histories[str(users[lo])] = (rows[lo_kept:hi], times[lo_kept:hi])
  return histories, counts


def run_batch(item_embeddings: str, actions: str, out: str, alpha: float = DEFAULTS["alpha"],
              lam: float = DEFAULTS["lam"], window_days: float = DEFAULTS["window_days"],
              now: int | None = None, max_history: int = DEFAULTS["max_history"],
              kind: str | None = None) -> dict:
  """The daily batch job: writes out/{medoids,members}.parquet and summary.json; returns it.

  now: unix seconds the window ends at and ages are measured from (default: the latest action).
  """
  t0 = time.time()
  if alpha < 0 or lam < 0 or window_days <= 0 or max_history < 1:
    raise ValueError(f"need alpha >= 0, lambda >= 0, window_days > 0, max_history >= 1; got "
                     f"{alpha}, {lam}, {window_days}, {max_history}")
  items = read_items(item_embeddings, kind)
  users, item_ids, times = read_actions(actions)
  if not len(times):
    raise ValueError(f"{actions}: no actions")
  now = int(times.max()) if now is None else int(now)
  histories, dropped = window_histories(items, users, item_ids, times, now, window_days,
                                        max_history)
  t1 = time.time()
  states = cluster_users(items, histories, now, alpha, lam)
  cluster_s = time.time() - t1
  write_states(states, items, out)
  counts = [len(s.clusters.importance) for s in states.values()]
  summary = {"out": out, "users": len(states), "actions": int(len(times)),
             "actions_clustered": int(sum(len(s.rows) for s in states.values())),
             "rows_left_out": dropped, "clusters": int(sum(counts)),
             "clusters_per_user": {"mean": round(float(np.mean(counts)), 2) if counts else 0.0,
                                   "max": int(max(counts, default=0))},
             "alpha": alpha, "lambda": lam, "window_days": window_days, "now": now,
             "items": len(items.ids), "dim": int(items.vectors.shape[1]),
             "cluster_seconds": round(cluster_s, 3),
             "users_per_s": round(len(states) / max(cluster_s, 1e-9), 1),
             "seconds": round(time.time() - t0, 2)}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def train(config, workdir: str) -> dict:
  """`launch.py train` of PinnerSage (configs/pinnersage_movielens.py): the batch job, its output
  in `workdir`."""
  engine = config.get("engine", "local")
  if engine not in ("local", "ray"):
    raise ValueError(f"config.engine must be one of ('local', 'ray'), got {engine!r}")
  if engine == "ray":   # Ray Data, one group per user (ray_job.py); only then is Ray imported
    from omnisage.serving.pinnersage.ray_job import train_on_ray
    return train_on_ray(config, workdir)
  if not config.actions:
    raise ValueError("config.actions is required: a Parquet file of user_id, item_id, timestamp "
                     "(--config.actions=PATH)")
  return {**run_batch(config.item_embeddings, config.actions, workdir, alpha=config.alpha,
                      lam=config.lam, window_days=config.window_days, now=config.now,
                      max_history=config.max_history, kind=config.item_kind), "engine": engine}


def write_states(states: dict, items: Items, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  med = {"user_id": [], "cluster": [], "medoid_id": [], "importance": [], "size": []}
  mem = {"user_id": [], "item_id": [], "timestamp": [], "cluster": []}
  for user in sorted(states):
    s, c = states[user], states[user].clusters
    k = len(c.importance)
    med["user_id"] += [user] * k
    med["cluster"] += list(range(k))
    med["medoid_id"] += [items.ids[r] for r in s.rows[c.medoids]]
    med["importance"] += list(c.importance)
    med["size"] += list(c.sizes)
    mem["user_id"] += [user] * len(s.rows)
    mem["item_id"] += [items.ids[r] for r in s.rows]
    mem["timestamp"] += list(s.times)
    mem["cluster"] += list(c.labels)
  pq.write_table(pa.table({"user_id": pa.array(med["user_id"], pa.string()),
                           "cluster": pa.array(med["cluster"], pa.int32()),
                           "medoid_id": pa.array(med["medoid_id"], pa.string()),
                           "importance": pa.array(med["importance"], pa.float64()),
                           "size": pa.array(med["size"], pa.int32())}),
                 os.path.join(out, "medoids.parquet"))
  pq.write_table(pa.table({"user_id": pa.array(mem["user_id"], pa.string()),
                           "item_id": pa.array(mem["item_id"], pa.string()),
                           "timestamp": pa.array(mem["timestamp"], pa.int64()),
                           "cluster": pa.array(mem["cluster"], pa.int32())}),
                 os.path.join(out, "members.parquet"))
