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

HTTP: `pinnersage_router(service)` adds POST /v1/pinnersage/update and /v1/pinnersage/recommend
(errors in the JSON shape of omnisage/serving/service/api.py; the app must `api.install` its
handlers, as
`create_app` here and server.create_app do).

Usage:
  service = PinnerSageService.load("runs/ps", "runs/tt/embeddings", index=load_index(...)["pins"])
  service.update("u1", [("item9", 1700000000)]); service.recommend("u1", k=400, seed=0)
"""

import json
import os
import threading
import time

import numpy as np
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from omnisage.models import pinnersage as model
from omnisage.serving.pinnersage.batch import (
  DEFAULTS,
  Items,
  cluster_users,
  read_items,
  read_parquet,
  window_histories,
)
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
    table = read_parquet(path)
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
