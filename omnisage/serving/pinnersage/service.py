"""PinnerSage serving (SPEC §4): the daily batch job, candidate retrieval, the online pass, HTTP.

Daily batch (`run_batch`, `launch.py pinnersage`): every user's actions of the last `window_days`
(90) before `now` are clustered with Ward (omnisage.models.pinnersage, cut at alpha); each cluster
becomes its medoid and an importance sum_i exp(-lambda * age_days_i) (lambda 0.01). Output:

  <out>/medoids.parquet  user_id string, cluster int32, medoid_id string, importance float64,
                         size int32 (one row per cluster; clusters in order of first action)
  <out>/members.parquet  user_id string, item_id string, timestamp int64, cluster int32 (the
                         actions clustered: the online pass continues from them)
  <out>/summary.json     the returned summary (counts, parameters, users/s)

Input rows are never dropped silently: rows whose item has no embedding, rows older than the
window and rows after `now` are counted in the summary; null fields are an error.

Retrieval (`candidates`): sample 3 medoids without replacement with probability proportional to
importance (a user with fewer clusters uses them all), query the index with each, and merge the
ranked lists round-robin (rank 1 of every medoid, then rank 2, ...) without duplicates, up to 400.
Because importances of one user share the factor exp(-lambda * now), the sampling does not depend
on `now`.

Online pass (`PinnerSageService.update`): today's actions join the cluster Ward would merge them
into first when that merge height is <= alpha, else open a singleton (models.online_assign); the
touched user's medoids and importances are recomputed exactly. The daily reconcile
(`PinnerSageService.reconcile`) re-runs the batch clustering over the 90-day window, so after it
the state equals `run_batch` over all actions.

HTTP: `pinnersage_router(service)` adds POST /v1/pinnersage/update and /v1/pinnersage/recommend
(errors in the JSON shape of omnisage/serving/service/api.py; the app must `api.install` its handlers, as
`create_app` here and server.create_app do).

Usage:
  summary = run_batch("runs/tt/embeddings", "actions.parquet", "runs/ps", alpha=0.8)
  service = PinnerSageService.load("runs/ps", "runs/tt/embeddings", index=load_index(...)["pins"])
  service.update("u1", [("item9", 1700000000)]); service.recommend("u1", k=400, seed=0)
"""

import dataclasses
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from omnisage.models import pinnersage as model
from omnisage.serving.index.scann_index import read_embeddings
from omnisage.serving.service import api
from omnisage.serving.service.api import ApiError

DEFAULTS = dict(
    alpha=1.4,          # Ward cut height, in embedding units: the best of {0.7, 1.0, 1.4} on
                        # MovieLens validation, unit-norm embeddings (benchmarks/pinnersage.py)
    lam=0.01,           # importance decay per day (SPEC §4)
    window_days=90.0,   # the batch job's history window (SPEC §4)
    max_history=1024,   # most recent actions kept per user (bounds the O(n^3) merge loop)
)
BUDGET = 400       # candidates per user (the paper's 400)
SAMPLES = 3        # medoids sampled per request
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
  table = _read_parquet(path)
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


def _read_parquet(path: str) -> pa.Table:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  try:
    return pq.read_table(path)
  except (OSError, pa.ArrowException) as error:
    raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def read_actions(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user_id str [n], item_id str [n], timestamp int64 [n]) of an actions Parquet file."""
  table = _read_parquet(path)
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


def sample_clusters(importance: np.ndarray, rng: np.random.Generator,
                    samples: int = SAMPLES) -> np.ndarray:
  """Cluster indices: min(samples, k) drawn without replacement, P proportional to importance."""
  importance = np.asarray(importance, np.float64)
  k = len(importance)
  if k <= samples:
    return np.arange(k)
  total = importance.sum()
  p = importance / total if total > 0 and np.isfinite(total) else None   # all zero -> uniform
  if p is not None and np.count_nonzero(p) < samples:
    p = None
  return rng.choice(k, size=samples, replace=False, p=p)


def merge_round_robin(ranked: list, budget: int, exclude=()) -> list:
  """Rank 1 of every list, then rank 2, ...: the first `budget` distinct items not excluded."""
  seen, out = set(exclude), []
  for depth in range(max((len(r) for r in ranked), default=0)):
    for r in ranked:
      if depth < len(r) and r[depth] not in seen:
        seen.add(r[depth])
        out.append(r[depth])
        if len(out) == budget:
          return out
  return out


def candidates(queries: np.ndarray, search, budget: int = BUDGET, exclude=()) -> list:
  """Merged candidates of the query vectors; search(queries, k) -> ranked item lists."""
  if not len(queries):
    return []
  return merge_round_robin(search(queries, budget + len(exclude)), budget, exclude)


class PinnerSageService:
  """Users' PinnerSage state, the online pass, the daily reconcile and retrieval (no HTTP)."""

  def __init__(self, items: Items, index, states: dict | None = None, clock=time.time,
               **options):
    unknown = set(options) - set(DEFAULTS)
    if unknown:
      raise ValueError(f"unknown PinnerSage options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    self.options = {**DEFAULTS, **options}
    self.items, self.index, self.clock = items, index, clock
    self.states = dict(states or {})
    self.lock = threading.Lock()   # routes run on a thread pool; updates replace users' states
    if index is not None:
      missing = sum(1 for i in index.ids if i not in items.row)
      if missing:
        raise ValueError(f"{missing} of the index's {index.size} items have no embedding")

  @classmethod
  def load(cls, batch_dir: str, item_embeddings, index=None, **options) -> "PinnerSageService":
    """From run_batch's output (members.parquet, summary.json) and the same item embeddings."""
    items = item_embeddings if isinstance(item_embeddings, Items) else read_items(item_embeddings)
    path = os.path.join(batch_dir, "members.parquet")
    table = _read_parquet(path)
    with open(os.path.join(batch_dir, "summary.json")) as f:
      summary = json.load(f)
    options = {"alpha": summary["alpha"], "lam": summary["lambda"],
               "window_days": summary["window_days"], **options}
    service = cls(items, index, **options)
    users = np.asarray(table.column("user_id").to_pylist(), object)
    ids = table.column("item_id").to_pylist()
    rows = np.asarray([items.row.get(i, -1) for i in ids], np.int64)
    if (rows < 0).any():
      raise ValueError(f"{path}: {(rows < 0).sum()} items have no embedding in {item_embeddings}")
    times = table.column("timestamp").to_numpy()
    labels = table.column("cluster").to_numpy().astype(np.int32)
    histories, given = {}, {}
    order = np.argsort(users.astype(str), kind="stable")   # keeps each user's time order
    users, rows, times, labels = users[order], rows[order], times[order], labels[order]
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
      histories[users[lo]] = (rows[lo:hi], times[lo:hi])
      given[users[lo]] = labels[lo:hi]
    service.states = cluster_users(items, histories, summary["now"], service.options["alpha"],
                                   service.options["lam"], labels=given)
    return service

  def update(self, user_id: str, actions: list, now: int | None = None) -> dict:
    """The online pass: folds (item_id, timestamp) actions into the user's clusters."""
    with self.lock:
      return self._update(user_id, actions, now)

  def _update(self, user_id: str, actions: list, now: int | None) -> dict:
    now = int(self.clock() if now is None else now)
    known = [(self.items.row[i], int(t)) for i, t in actions if i in self.items.row]
    unknown = len(actions) - len(known)
    state = self.states.get(user_id)
    old_rows = state.rows if state else np.zeros(0, np.int64)
    old_times = state.times if state else np.zeros(0, np.int64)
    old_labels = state.clusters.labels if state else np.zeros(0, np.int32)
    known.sort(key=lambda rt: (rt[1], self.items.ids[rt[0]], rt[0]))
    new_rows = np.asarray([r for r, _ in known], np.int64)
    new_times = np.asarray([t for _, t in known], np.int64)
    labels = model.online_assign(old_labels, self.items.vectors[old_rows],
                                 self.items.vectors[new_rows], self.options["alpha"])
    rows, times = np.r_[old_rows, new_rows], np.r_[old_times, new_times]
    if len(rows):
      self.states[user_id] = cluster_users(self.items, {user_id: (rows, times)}, now,
                                           self.options["alpha"], self.options["lam"],
                                           labels={user_id: labels})[user_id]
    return {"user_id": user_id, "added": len(known), "unknown_items": unknown,
            **self.describe(user_id)}

  def reconcile(self, now: int | None = None) -> dict:
    """The daily batch over the window, from the actions the state holds: equals run_batch."""
    with self.lock:
      return self._reconcile(now)

  def _reconcile(self, now: int | None) -> dict:
    now = int(self.clock() if now is None else now)
    users, ids, times = [], [], []
    for user, s in self.states.items():
      users += [user] * len(s.rows)
      ids += [self.items.ids[r] for r in s.rows]
      times += list(s.times)
    histories, dropped = window_histories(self.items, users, ids, times, now,
                                          self.options["window_days"],
                                          self.options["max_history"])
    self.states = cluster_users(self.items, histories, now, self.options["alpha"],
                                self.options["lam"])
    return {"users": len(self.states), "rows_left_out": dropped}

  def describe(self, user_id: str) -> dict:
    s = self.states.get(user_id)
    if s is None:
      return {"clusters": 0, "medoids": []}
    c = s.clusters
    return {"clusters": len(c.importance), "medoids": [
        {"item_id": self.items.ids[s.rows[m]], "importance": float(w), "size": int(n)}
        for m, w, n in zip(c.medoids, c.importance, c.sizes)]}

  def recommend(self, user_id: str, k: int = BUDGET, seed: int | None = None) -> dict:
    """Up to k candidate items from 3 importance-sampled medoids (KeyError: unknown user)."""
    with self.lock:
      s = self.states[user_id]
    picked = sample_clusters(s.clusters.importance, np.random.default_rng(seed))
    medoid_rows = s.rows[s.clusters.medoids[picked]]
    found = candidates(self.items.vectors[medoid_rows], self._search, k)
    return {"user_id": user_id, "medoids": [self.items.ids[r] for r in medoid_rows],
            "candidates": [{"id": self.index.ids[r], "title": self.index.titles[r]}
                           for r in found]}

  def _search(self, queries, k):
    _, rows = self.index.search(queries, min(k, self.index.size))
    return [[int(r) for r in row if r >= 0] for row in rows]


class Action(BaseModel):
  model_config = ConfigDict(extra="forbid")
  item_id: StrictStr = Field(min_length=1)
  timestamp: StrictInt = Field(description="Unix seconds.")


class UpdateRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  user_id: StrictStr = Field(min_length=1)
  actions: list[Action] = Field(min_length=1, max_length=10_000)
  now: StrictInt | None = Field(None, description="Unix seconds importances are measured from "
                                "(default: the server's clock).")


class RecommendRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  user_id: StrictStr = Field(min_length=1)
  k: StrictInt = Field(BUDGET, ge=1, le=BUDGET, description="Candidates wanted (<= 400).")
  seed: StrictInt | None = Field(None, description="Seed of the medoid sampling (reproducible).")


def pinnersage_router(service: PinnerSageService) -> APIRouter:
  """POST /v1/pinnersage/update and /v1/pinnersage/recommend over `service`."""
  router = APIRouter()

  @router.post("/v1/pinnersage/update", responses=api.ERROR_RESPONSES)
  def update(body: UpdateRequest):
    """Folds today's actions into the user's clusters (the online pass)."""
    return service.update(body.user_id, [(a.item_id, a.timestamp) for a in body.actions],
                          body.now)

  @router.post("/v1/pinnersage/recommend", responses=api.ERROR_RESPONSES)
  def recommend(body: RecommendRequest):
    """Up to k (<= 400) candidate items for a user."""
    if body.user_id not in service.states:
      raise ApiError(404, "not_found", f"user_id: no PinnerSage clusters for user "
                     f"{body.user_id!r}", "user_id")
    return service.recommend(body.user_id, body.k, body.seed)

  return router


def create_app(service: PinnerSageService, max_body_bytes: int = 1 << 20) -> FastAPI:
  """A standalone app with only the PinnerSage routes (the lead mounts the router elsewhere)."""
  app = FastAPI(title="omnisage PinnerSage", version="1")
  api.install(app, max_body_bytes)
  app.include_router(pinnersage_router(service))
  return app
