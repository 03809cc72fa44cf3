"""PinnerSage serving (SPEC §4): candidate retrieval, the online pass, HTTP.

The daily batch job that produces the clusters is batch.py.

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

Durability (store.py): with a `store`, every acknowledged update is written to it (one
durable transaction) before `update` returns, and a restarted service reads a user's record back
the first time the user is touched (a key-value get, no scan). A record continues the batch it
was made on ("batch": the batch output's identity); after a NEW batch, a record's actions later
than that batch's `now` are folded onto the new batch state by the online pass (the batch job
read the earlier ones from the actions log).

HTTP: `pinnersage_router(service)` adds POST /v1/pinnersage/update and /v1/pinnersage/recommend
(errors in the JSON shape of omnisage/serving/service/api.py; the app must `api.install` its
handlers, as `create_app` here and server.create_app do).

Usage:
  service = PinnerSageService.load("runs/ps", "runs/tt/embeddings", index=load_index(...)["pins"],
                                   store=SQLiteStore("runs/ps/online.sqlite"))
  service.update("u1", [("item9", 1700000000)]); service.recommend("u1", k=400, seed=0)
  python -m omnisage.serving.pinnersage.service --batch-dir runs/ps \
      --item-embeddings runs/tt/embeddings --state-db runs/ps/online.sqlite --port 8090
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time

import numpy as np
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from omnisage.models import pinnersage as model
from omnisage.serving.pinnersage.batch import (
  DEFAULTS,
  Items,
  UserState,
  cluster_users,
  read_items,
  read_parquet,
  window_histories,
)
from omnisage.serving.pinnersage.store import SQLiteStore
from omnisage.serving.service import api
from omnisage.serving.service.api import ApiError

BUDGET = 400       # candidates per user (the paper's 400)
SAMPLES = 3        # medoids sampled per request


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


class ExactIndex:
  """Exact inner-product search over the item embeddings (a service without an ANN index)."""

  def __init__(self, items: Items):
    self.items, self.ids, self.titles = items, items.ids, items.titles
    self.size = len(items.ids)

  def search(self, queries, k):
    scores = np.asarray(queries, np.float32) @ self.items.vectors.T
    k = min(k, self.size)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    rows = np.take_along_axis(top, order, 1)
    return np.take_along_axis(scores, rows, 1), rows


def batch_identity(batch_dir: str, summary: dict) -> str:
  """A batch output's identity: its `now` and the digest of its members table."""
  digest = hashlib.sha256()
  with open(os.path.join(batch_dir, "members.parquet"), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return f"{summary['now']}:{digest.hexdigest()[:16]}"


class PinnerSageService:
  """Users' PinnerSage state, the online pass, the daily reconcile and retrieval (no HTTP).

  store: a StateStore (store.py) every acknowledged update is written to; None keeps the state in
  memory only. batch_id / batch_now: the batch the in-memory states come from (load sets them).
  """

  def __init__(self, items: Items, index, states: dict | None = None, clock=time.time,
               store=None, batch_id: str = "", batch_now: int | None = None, **options):
    unknown = set(options) - set(DEFAULTS)
    if unknown:
      raise ValueError(f"unknown PinnerSage options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    self.options = {**DEFAULTS, **options}
    self.items, self.clock = items, clock
    self.index = ExactIndex(items) if index is None else index
    self.states = dict(states or {})
    self.store, self.batch_id, self.batch_now = store, batch_id, batch_now
    self.restored: set = set()   # users whose stored record has been read (or found absent)
    self.lock = threading.Lock()   # routes run on a thread pool; updates replace users' states
    if index is not None:
      missing = sum(1 for i in index.ids if i not in items.row)
      if missing:
        raise ValueError(f"{missing} of the index's {index.size} items have no embedding")

  @classmethod
  def load(cls, batch_dir: str, item_embeddings, index=None, store=None,
           **options) -> "PinnerSageService":
    """From run_batch's output (members.parquet, summary.json) and the same item embeddings."""
    items = item_embeddings if isinstance(item_embeddings, Items) else read_items(item_embeddings)
    path = os.path.join(batch_dir, "members.parquet")
    table = read_parquet(path)
    with open(os.path.join(batch_dir, "summary.json")) as f:
      summary = json.load(f)
    options = {"alpha": summary["alpha"], "lam": summary["lambda"],
               "window_days": summary["window_days"], **options}
    service = cls(items, index, store=store, batch_id=batch_identity(batch_dir, summary),
                  batch_now=int(summary["now"]), **options)
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

  # --- durable state -------------------------------------------------------------------------

  def record(self, state: UserState) -> dict:
    """The store's record of a user's state (item ids, not rows: see store.py)."""
    return {"batch": self.batch_id, "item_ids": [self.items.ids[r] for r in state.rows],
            "times": [int(t) for t in state.times],
            "labels": [int(c) for c in state.clusters.labels], "now": int(state.now)}

  def _state(self, user_id: str) -> UserState | None:
    """The user's state, its stored record read back on first touch (call under the lock)."""
    if self.store is not None and user_id not in self.restored:
      self.restored.add(user_id)   # first: _restore's online pass comes back through here
      record = self.store.get(user_id)
      if record is not None:
        self._restore(user_id, record)
    return self.states.get(user_id)

  def _restore(self, user_id: str, record: dict) -> None:
    rows = np.asarray([self.items.row.get(i, -1) for i in record["item_ids"]], np.int64)
    times = np.asarray(record["times"], np.int64)
    if record["batch"] == self.batch_id and (rows >= 0).all() and len(rows):
      # The record continues this very batch: it IS the acknowledged state.
      self.states[user_id] = cluster_users(
          self.items, {user_id: (rows, times)}, record["now"], self.options["alpha"],
          self.options["lam"], labels={user_id: np.asarray(record["labels"], np.int32)})[user_id]
      return
    # A newer batch read the actions log up to its `now`; later acknowledged actions are folded
    # onto it by the online pass (as they were when first acknowledged).
    later = [(self.items.ids[r], int(t)) for r, t in zip(rows, times)
             if r >= 0 and (self.batch_now is None or t > self.batch_now)]
    if later:
      self._update(user_id, later, record["now"], persist=False)

  # --- the online pass, the reconcile, retrieval ---------------------------------------------

  def has_user(self, user_id: str) -> bool:
    with self.lock:
      return self._state(user_id) is not None

  def update(self, user_id: str, actions: list, now: int | None = None) -> dict:
    """The online pass: folds (item_id, timestamp) actions into the user's clusters; with a store,
    the new state is durable before this returns."""
    with self.lock:
      return self._update(user_id, actions, now)

  def _update(self, user_id: str, actions: list, now: int | None, persist: bool = True) -> dict:
    now = int(self.clock() if now is None else now)
    known = [(self.items.row[i], int(t)) for i, t in actions if i in self.items.row]
    unknown = len(actions) - len(known)
    state = self._state(user_id)
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
      new_state = cluster_users(self.items, {user_id: (rows, times)}, now,
                                self.options["alpha"], self.options["lam"],
                                labels={user_id: labels})[user_id]
      if persist and self.store is not None:
        self.store.put(user_id, self.record(new_state))   # durable before it is acknowledged
      self.states[user_id] = new_state
    return {"user_id": user_id, "added": len(known), "unknown_items": unknown,
            **self._describe(user_id)}

  def reconcile(self, now: int | None = None) -> dict:
    """The daily batch over the window, from the actions the state holds: equals run_batch."""
    with self.lock:
      return self._reconcile(now)

  def _reconcile(self, now: int | None) -> dict:
    now = int(self.clock() if now is None else now)
    if self.store is not None:
      for user in self.store.users():   # users only the store knows since the restart
        self._state(user)
    users, ids, times = [], [], []
    for user, s in self.states.items():
      users += [user] * len(s.rows)
      ids += [self.items.ids[r] for r in s.rows]
      times += list(s.times)
    histories, dropped = window_histories(self.items, users, ids, times, now,
                                          self.options["window_days"],
                                          self.options["max_history"])
    states = cluster_users(self.items, histories, now, self.options["alpha"],
                           self.options["lam"])
    if self.store is not None:
      self.store.put_many({u: self.record(s) for u, s in states.items()})
    self.states = states
    return {"users": len(self.states), "rows_left_out": dropped}

  def describe(self, user_id: str) -> dict:
    with self.lock:
      return self._describe(user_id)

  def _describe(self, user_id: str) -> dict:
    s = self._state(user_id)
    if s is None:
      return {"clusters": 0, "medoids": []}
    c = s.clusters
    return {"clusters": len(c.importance), "medoids": [
        {"item_id": self.items.ids[s.rows[m]], "importance": float(w), "size": int(n)}
        for m, w, n in zip(c.medoids, c.importance, c.sizes)]}

  def recommend(self, user_id: str, k: int = BUDGET, seed: int | None = None) -> dict:
    """Up to k candidate items from 3 importance-sampled medoids (KeyError: unknown user)."""
    with self.lock:
      s = self._state(user_id)
    if s is None:
      raise KeyError(user_id)
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
    if not service.has_user(body.user_id):
      raise ApiError(404, "not_found", f"user_id: no PinnerSage clusters for user "
                     f"{body.user_id!r}", "user_id")
    return service.recommend(body.user_id, body.k, body.seed)

  return router


def create_app(service: PinnerSageService, max_body_bytes: int = 1 << 20) -> FastAPI:
  """A standalone app with only the PinnerSage routes (the lead mounts the router elsewhere)."""
  app = FastAPI(title="omnisage PinnerSage", version="1")
  api.install(app, max_body_bytes)
  app.include_router(pinnersage_router(service))

  @app.get("/healthz")
  async def healthz():
    return api.health({"users": lambda: len(service.states),
                       "store": lambda: getattr(service.store, "path", None)},
                      system="pinnersage")

  return app


def main(argv=None) -> int:
  """Serves the PinnerSage routes alone over a batch output, durable with --state-db; runs until
  SIGINT/SIGTERM (bad input: exit 2 with the reason)."""
  from omnisage.serving.service.runner import run_until_signal
  parser = argparse.ArgumentParser(description="PinnerSage online service (SPEC §4)")
  parser.add_argument("--batch-dir", required=True, help="run_batch output directory")
  parser.add_argument("--item-embeddings", required=True,
                      help="the embeddings the batch job clustered")
  parser.add_argument("--state-db", default=None,
                      help="SQLite file of acknowledged updates (default: in memory only)")
  parser.add_argument("--index", default=None, help="launch.py index directory (default: "
                      "exact search over the item embeddings)")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8090)
  args = parser.parse_args(argv)
  try:
    index = None
    if args.index:
      from omnisage.serving.index.scann_index import load_index
      indexes = load_index(args.index)
      if len(indexes) != 1:
        raise ValueError(f"{args.index}: expected one item index, found {sorted(indexes)}")
      index = next(iter(indexes.values()))
    store = SQLiteStore(args.state_db) if args.state_db else None
    service = PinnerSageService.load(args.batch_dir, args.item_embeddings, index=index,
                                     store=store)
    url, stopped = run_until_signal(create_app(service), args.host, args.port,
                                    "serving {url}v1/pinnersage")
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"pinnersage_service": {"error": str(error)}}))
    return 2
  print(json.dumps({"pinnersage_service": {"url": url, "stopped_by": stopped,
                                           "users": len(service.states)}}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
