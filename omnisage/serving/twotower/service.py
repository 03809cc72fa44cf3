"""Home-feed recommendation service (SPEC §3 "Serving"): POST /v1/recommend.

The user embedding is computed online per request from the exported user tower (the request's
engagement history -> the same features as training, omnisage/data/twotower/examples.py
`user_features`), then the ScaNN index of the offline item embeddings (`launch.py embed` +
`launch.py index`, kind "items") returns the top k by dot product.

  POST /v1/recommend {"history": [{"item_id": "318", "timestamp": 1500000000}, ...],
                      "k": 100, "exclude_history": true, "now": 1500001000}
  -> {"items": [{"id": "...", "title": "...", "score": 0.83}, ...], "history_used": 2}

`history`: 0..max_history engagements in any order (an empty one is a cold-start user); the most
recent `history_len` items are the tower's history, all of them count for the user features.
`now` (unix seconds, optional): when the feed is requested; default the server clock. The ages
are taken relative to it, and an engagement after `now` is an error. `exclude_history` drops the
history's items from the results. Unknown item ids are an error (the user tower reads each history
item's genres from the bundle's catalogue).

Errors: the JSON shape of omnisage/serving/service/api.py
({"error": {"code", "message", "field"}}), e.g.
422 invalid_request with field "history[3].item_id"; 413 payload_too_large beyond max_history.

Usage:
  app = create_recommend_app("runs/twotower/bundle", "runs/twotower/index",
                             extra_routers=(pinnersage_router,))
  summary = serve_recommend("runs/twotower/bundle", "runs/twotower/index", port=8080)
"""

import asyncio
import logging
import time

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from omnisage.data.twotower.examples import user_features
from omnisage.serving.service import api, auth
from omnisage.serving.service.api import ApiError
from omnisage.serving.service.limits import Limits
from omnisage.serving.twotower.bundle import KIND, TOWERS, TwoTowerBundle, load_twotower_bundle

log = logging.getLogger("omnisage")

DEFAULTS = dict(
    max_history=10_000,   # engagements per request before 413
    warmup=True,          # compile the user tower before serving
)


class Engagement(BaseModel):
  model_config = ConfigDict(extra="forbid")
  item_id: StrictStr = Field(description="Catalogue id of the engaged item (MovieLens movieId).")
  timestamp: StrictInt = Field(description="When (unix seconds).")


class RecommendRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  history: list[Engagement] = Field(description="The user's engagements, any order.")
  k: StrictInt = Field(100, ge=1, le=api.MAX_K, description="Items to return.")
  exclude_history: StrictBool = Field(True, description="Leave out items already in history.")
  now: StrictInt | None = Field(None, description="Request time (unix seconds); default: now.")


class RecommendedItem(BaseModel):
  id: str
  title: str
  score: float = Field(description="Dot product of the user and item embeddings.")


class RecommendResponse(BaseModel):
  items: list[RecommendedItem]
  history_used: int = Field(description="History items the user tower read (most recent).")


class Recommender:
  """Request -> user tower -> index (no HTTP in here)."""

  def __init__(self, bundle: TwoTowerBundle, index, options: dict, clock=time.time):
    self.bundle, self.index, self.options, self.clock = bundle, index, options, clock
    self.history_len = int(bundle.dims["history_len"])
    self.requests = 0

  def user_vector(self, history: list[Engagement], now: int) -> tuple[np.ndarray, int]:
    catalogue = self.bundle.catalogue
    items = np.zeros(len(history), np.int32)
    stamps = np.zeros(len(history), np.int64)
    for i, event in enumerate(history):
      index = catalogue.index_of.get(event.item_id)
      if index is None:
        raise ApiError(422, "invalid_request", f"history[{i}].item_id: unknown item "
                       f"{event.item_id!r}", f"history[{i}].item_id")
      if event.timestamp > now:
        raise ApiError(422, "invalid_request", f"history[{i}].timestamp: {event.timestamp} is "
                       f"after now ({now})", f"history[{i}].timestamp")
      items[i], stamps[i] = index, event.timestamp
    order = np.lexsort((items, stamps))   # ascending time, as training histories are
    hist, ages, dense = user_features(items[order], stamps[order], float(now), self.history_len)
    inputs = catalogue.user_inputs(hist[None], ages[None], dense[None])
    vector = self.bundle.embed_users(*(inputs[k] for k in TOWERS["user_tower"]))[0]
    return vector, int(min(len(history), self.history_len))

  def recommend(self, body: RecommendRequest) -> dict:
    now = self.clock() if body.now is None else body.now
    vector, used = self.user_vector(body.history, int(now))
    exclude = {e.item_id for e in body.history} if body.exclude_history else set()
    # Ask for enough extra rows that k remain after dropping the excluded ones.
    want = min(body.k + len(exclude), self.index.size)
    scores, rows = self.index.search(vector[None].astype(np.float32), want)
    items = [{"id": self.index.ids[r], "title": self.index.titles[r], "score": float(s)}
             for s, r in zip(scores[0], rows[0]) if r >= 0 and self.index.ids[r] not in exclude]
    return {"items": items[:body.k], "history_used": used}


def _load_index(index_path, embed_dim: int):
  if isinstance(index_path, dict):
    indexes = index_path
  else:
    from omnisage.serving.index.scann_index import load_index
    indexes = load_index(index_path)
  if KIND not in indexes:
    raise ValueError(f"{index_path}: no {KIND!r} index (launch.py embed with the two-tower bundle,"
                     " then launch.py index)")
  index = indexes[KIND]
  if index.dim != embed_dim:
    raise ValueError(f"{index_path}/{KIND}: index dim {index.dim} but the bundle's embed_dim is "
                     f"{embed_dim}: index and bundle come from different models")
  return index


def create_recommend_app(bundle_path, index_path, extra_routers=(), clock=time.time,
                         auth_token: str | None = None, **options) -> FastAPI:
  """Loads and checks the bundle and the index, compiles the user tower, returns the app.

  bundle_path / index_path: directories, or a loaded TwoTowerBundle / {kind: KindIndex}.
  extra_routers: APIRouters mounted as they are (e.g. PinnerSage's). clock: the default `now`.
  auth_token: required as a bearer token on every route but /healthz, the extra routers' too
  (auth.py); None: no authentication.
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown recommend options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  options = {**DEFAULTS, **options}
  bundle = bundle_path if isinstance(bundle_path, TwoTowerBundle) else \
      load_twotower_bundle(bundle_path)
  index = _load_index(index_path, int(bundle.dims["embed_dim"]))
  service = Recommender(bundle, index, options, clock)
  if options["warmup"]:
    t0 = time.perf_counter()
    service.user_vector([], 0)
    log.info("compiled the user tower in %.1f s", time.perf_counter() - t0)

  app = FastAPI(title="omnisage home-feed recommendations", version="1",
                description="Two-tower recommendations (SPEC §3 \"Serving\").")
  app.state.recommender = service
  # ~80 bytes per engagement as JSON, plus headroom for the other fields.
  api.install(app, max_body_bytes=128 * options["max_history"] + 65536)
  auth.install(app, auth_token)   # outside the body guard: no body is read for a stranger

  @app.post("/v1/recommend", response_model=RecommendResponse, responses=api.ERROR_RESPONSES)
  async def recommend(body: RecommendRequest):
    """Top-k items for a user given their engagement history."""
    service.requests += 1
    if len(body.history) > options["max_history"]:
      raise ApiError(413, "payload_too_large", f"history: {len(body.history)} engagements, more "
                     f"than the limit of {options['max_history']}", "history")
    # The tower call and the ScaNN search run off the event loop.
    return JSONResponse(await asyncio.to_thread(service.recommend, body))

  @app.get("/healthz")
  async def healthz():
    return api.health({"bundle_step": lambda: bundle.step,
                       "embed_dim": lambda: int(bundle.dims["embed_dim"]),
                       "index_size": lambda: index.size, "requests": lambda: service.requests},
                      system="twotower")

  for router in extra_routers:
    app.include_router(router)
  return app


def serve_config(config) -> dict:
  """`launch.py serve` of a two-tower bundle (configs/serve.py): POST /v1/recommend, and the
  PinnerSage routes on the same item index when `config.pinnersage` names a batch-job output.

  PinnerSage's online pass (Pal et al., KDD 2020) changes a user's clusters between two daily
  batch runs; with `config.pinnersage_state_db` every acknowledged update is in that SQLite file
  before it is answered, so a killed and restarted server still answers with it (store.py).
  """
  token_file = config.get("auth_token_file")
  token = auth.read_token(token_file) if token_file else None   # before loading anything
  state_db = config.get("pinnersage_state_db") or ""
  index, routers = config.index, ()
  if state_db and not config.pinnersage:
    raise ValueError("config.pinnersage_state_db is set but config.pinnersage is not: the state "
                     "store holds online updates of a PinnerSage batch output")
  if config.pinnersage:
    from omnisage.serving.index.scann_index import load_index
    from omnisage.serving.pinnersage.service import PinnerSageService, pinnersage_router
    from omnisage.serving.pinnersage.store import SQLiteStore
    if not config.item_embeddings:
      raise ValueError("serve with config.pinnersage needs config.item_embeddings (the "
                       "embeddings the batch job clustered)")
    index = load_index(config.index)
    store = SQLiteStore(state_db) if state_db else None
    service = PinnerSageService.load(config.pinnersage, config.item_embeddings,
                                     index=index.get("items"), store=store)
    routers = (pinnersage_router(service),)
  return serve_recommend(config.bundle, index, host=config.host, port=config.port,
                         extra_routers=routers, limits=Limits.from_config(config),
                         auth_token=token)


def serve_recommend(bundle_path, index_path, host: str = "127.0.0.1", port: int = 8080,
                    extra_routers=(), limits: Limits | None = None,
                    auth_token: str | None = None, **options) -> dict:
  """Serves until SIGINT/SIGTERM (as omnisearchsage/service.py `serve`), then a summary.

  limits: the connection limits (runner.py, limits.py). auth_token: the bearer token every route
  but /healthz requires (auth.py; serve_config reads it from config.auth_token_file).
  """
  from omnisage.serving.service.runner import run_until_signal
  app = create_recommend_app(bundle_path, index_path, extra_routers, auth_token=auth_token,
                             **options)
  url, stopped = run_until_signal(app, host, port, "serving {url}v1/recommend", limits=limits,
                                  authenticated=auth_token is not None)
  return {"url": url, "requests": app.state.recommender.requests, "stopped_by": stopped}
