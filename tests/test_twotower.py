"""Home-feed two-tower (SPEC §3): towers, loss against NumPy, baselines by hand, sharding on a (4,2)
mesh, exact resume, and prepare -> train -> eval -> export -> embed -> index -> /v1/recommend on a
synthetic MovieLens-shaped folder (always runs); one check on the real files (skipped without)."""

import json
import os
import shutil
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest

from configs import twotower_movielens
from omnisage.baselines import popularity
from omnisage.data.sources import movielens
from omnisage.data.twotower import examples as mlx
from omnisage.data.twotower import pipeline as tt_pipeline
from omnisage.data.twotower import prepare as tt_prepare
from omnisage.data.workdir import prepared_dir_of
from omnisage.models.twotower import ITEM_INPUTS, USER_INPUTS
from omnisage.serving.twotower import bundle as tt_bundle
from omnisage.train.evaluators import twotower as twotower_eval
from omnisage.train.loop import restore_for_eval
from omnisage.train.twotower import trainer as twotower
from tests.helpers import ROOT, last_json, run_launch, running, subprocess_env

GENRES = ["Action", "Comedy", "Drama", "Horror"]
JSON = {"content-type": "application/json"}


def write_movielens(folder, num_users=40, num_movies=80, per_user=16, seed=0):
  """A MovieLens-shaped folder: users prefer one genre, rate over 200 days (a few bad rows)."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "movies.csv"), "w") as f:
    f.write("movieId,title,genres\n")
    for m in range(1, num_movies + 1):
      genre = GENRES[m % 4] + ("|" + GENRES[(m + 1) % 4] if m % 5 == 0 else "")
      f.write(f'{m * 3},"Film {m}, part {m % 7} ({1950 + m % 60})",{genre}\n')
    f.write("not_a_number,Broken,Drama\n")   # a bad row, counted
  with open(os.path.join(folder, "ratings.csv"), "w") as f:
    f.write("userId,movieId,rating,timestamp\n")
    for u in range(1, num_users + 1):
      liked = [m for m in range(1, num_movies + 1) if m % 4 == u % 4]
      picks = rng.choice(liked, size=per_user, replace=False)
      times = np.sort(rng.integers(1_000_000_000, 1_000_000_000 + 200 * 86400, per_user))
      for m, t in zip(picks, times):
        f.write(f"{u},{m * 3},{rng.integers(1, 11) / 2},{t}\n")
  with open(os.path.join(folder, "tags.csv"), "w") as f:
    f.write("userId,movieId,tag,timestamp\n")


def tiny_config(movielens_dir):
  config = twotower_movielens.get_config("tiny")
  config.data.movielens_dir = str(movielens_dir)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, train summary) of the tiny model trained on the synthetic folder."""
  root = tmp_path_factory.mktemp("twotower")
  write_movielens(root / "ml")
  config = tiny_config(root / "ml")
  workdir = str(root / "run")
  prepared = tt_prepare.prepare(config, workdir)
  assert prepared["bad_rows"]["by_reason"] == {"invalid_id": 1}
  summary = twotower.train(config, workdir)
  return config, workdir, summary


@pytest.fixture(scope="module")
def built(trained):
  """twotower.setup of the trained run (run, fresh state, statics, optimizer): built once."""
  config, workdir, _ = trained
  return twotower.setup(config, workdir)


def test_towers_give_unit_64d_vectors(built):
  run, state, statics, _ = built
  model = statics.model(state.params)
  examples = mlx.load_examples(run.prepared)
  batch = tt_pipeline.GatherBatch(examples, run.catalogue).map(np.arange(5))
  batch["hist_items"][0] = 0   # a user without history still gets a unit vector
  u = np.asarray(model.user_tower(*(batch[k] for k in USER_INPUTS)))
  v = np.asarray(model.item_tower(*(batch[k] for k in ITEM_INPUTS)))
  assert u.shape == v.shape == (5, 64)
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_loss_matches_numpy_in_batch_softmax_with_logq(trained, built):
  config = trained[0]
  run, state, statics, _ = built
  model = statics.model(state.params)
  examples = mlx.load_examples(run.prepared)
  batch = tt_pipeline.GatherBatch(examples, run.catalogue).map(np.arange(8))
  batch["item"][3] = batch["item"][5]     # an accidental hit: masked for each other
  batch["user"][:] = np.arange(8)
  batch["user"][6] = batch["user"][7]     # the same user: not each other's negatives
  log_q = np.log(np.linspace(0.05, 1.0, 8)).astype(np.float32)
  loss, _ = twotower.loss_fn(model, batch, log_q, config.loss)

  u = np.asarray(model.user_tower(*(batch[k] for k in USER_INPUTS)), np.float64)
  v = np.asarray(model.item_tower(*(batch[k] for k in ITEM_INPUTS)), np.float64)
  scale = np.exp(min(config.loss.temperature_init, config.loss.temperature_max))
  logits = scale * u @ v.T - log_q[None, :]          # SPEC: log Q subtracted after scaling
  ce = []
  for i in range(8):
    keep = [j for j in range(8) if j == i or (batch["item"][j] != batch["item"][i]
                                              and batch["user"][j] != batch["user"][i])]
    row = logits[i, keep]
    ce.append(np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i])
  assert float(loss) == pytest.approx(np.mean(ce), rel=1e-4)


def test_baselines_recall_by_hand():
  # 3 items; training users: A rated 1, 2; B rated 1, 3; C rated 1, 3. Eval user = A.
  users = {"seen": [[1, 2]], "positives": [[3]]}
  counts = popularity.cooccurrence_scores(np.array([0, 0, 1, 1, 2, 2]),
                                             np.array([1, 2, 1, 3, 1, 3]), users, num_items=3)
  # score(j) = C[1, j] + C[2, j]: C[1,3] = 2 (B, C), C[2,3] = 0; item 3 is the only unseen item.
  np.testing.assert_allclose(counts, [[3 + 1, 1 + 1, 2 + 0]])
  assert twotower_eval.recall(counts, users, ks=(1,))["recall@1"] == 1.0

  # Popularity with 4 items: window counts [0, 5, 1, 2], totals [9, 5, 1, 2]; the user saw item 2
  # and will rate items 1 and 3. By window the ranking of unseen items is 4, 3, 1: Recall@1 = 0
  # (item 4 is not a positive), Recall@2 = 1/2. By total: 1, 4, 3: Recall@1 = 1, Recall@2 = 1/2.
  class Cat:
    count_window = np.array([0, 0, 5, 1, 2])
    count_total = np.array([0, 9, 5, 1, 2])
  users = {"seen": [[2]], "positives": [[1, 3]]}
  window = twotower_eval.recall(popularity.popularity_scores(Cat, 1, "window"), users, (1, 2))
  total = twotower_eval.recall(popularity.popularity_scores(Cat, 1, "total"), users, (1, 2))
  assert (window["recall@1"], window["recall@2"]) == (0.0, 0.5)
  assert (total["recall@1"], total["recall@2"]) == (1.0, 0.5)


def test_examples_use_only_the_past(trained):
  config, workdir, _ = trained
  prepared = prepared_dir_of(config, workdir)
  meta = mlx.read_meta(prepared)
  examples = mlx.load_examples(prepared)
  assert (examples["timestamp"] < meta["cut"]).all()
  valid = examples["hist_items"] != 0
  assert (examples["hist_age"][valid] > 0).all()          # strictly before the target
  assert len(examples["item"]) == meta["ratings_before_cut"]
  users = mlx.load_eval_users(prepared)
  for seen, positives in zip(users["seen"], users["positives"]):
    assert not set(seen) & set(positives)


def test_end_to_end_recommend(trained, built, tmp_path):
  config, workdir, summary = trained
  assert summary["steps"] == config.train.steps
  result = twotower.evaluate(config, workdir)
  assert 0.0 <= result["recall"]["recall@50"] <= result["recall"]["recall@100"] <= 1.0
  bundle = str(tmp_path / "bundle")
  assert tt_bundle.export(config, workdir, bundle)["dims"]["embed_dim"] == 64

  # launch.py embed dispatches on the bundle's manifest.
  embeddings, index = str(tmp_path / "emb"), str(tmp_path / "index")
  out = run_launch("embed", f"--config={ROOT}/configs/twotower_movielens.py:tiny",
                   f"--workdir={workdir}", f"--bundle={bundle}",
                   f"--entities={bundle}/items.parquet", f"--out={embeddings}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert last_json(out)["embed"]["rows"] == 80
  import pyarrow.parquet as pq
  schema = pq.read_schema(os.path.join(embeddings, "items", "shard-00000.parquet"))
  assert [f.name for f in schema] == ["entity_index", "id", "title", "embedding"]
  assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[64]"

  from omnisage.serving.index.scann_index import build_index, read_embeddings
  from omnisage.serving.twotower.bundle import load_twotower_bundle
  from omnisage.serving.twotower.service import create_recommend_app
  build_index(embeddings, index, qps_seconds=0.05)
  tt = load_twotower_bundle(bundle)
  items = read_embeddings(os.path.join(embeddings, "items"))

  # The served user vector equals the trained model's on the same features (no skew).
  run, state, statics, _ = built
  _, params = restore_for_eval(config, workdir, state)
  history = [{"item_id": "3", "timestamp": 1_000_000_000},
             {"item_id": "15", "timestamp": 1_000_086_400}]
  now = 1_000_172_800
  hist, ages, dense = mlx.user_features(np.array([1, 5]), np.array([1_000_000_000, 1_000_086_400]),
                                        now, config.data.history_len)
  inputs = run.catalogue.user_inputs(hist[None], ages[None], dense[None])
  direct = np.asarray(statics.model(params.params).user_tower(*(inputs[k] for k in USER_INPUTS)))
  np.testing.assert_allclose(tt.embed_users(*(inputs[k] for k in USER_INPUTS)), direct, atol=1e-5)

  app = create_recommend_app(bundle, index)
  with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
    r = client.post("/v1/recommend", json={"history": history, "k": 10, "now": now})
    assert r.status_code == 200, r.text
    got = r.json()["items"]
    scores = items.vectors @ direct[0]
    order = [i for i in np.argsort(-scores) if items.ids[i] not in ("3", "15")][:10]
    assert [g["id"] for g in got] == [items.ids[i] for i in order]
    np.testing.assert_allclose([g["score"] for g in got], scores[order], atol=1e-4)
    assert all(g["title"] for g in got)
    kept = client.post("/v1/recommend", json={"history": history, "k": 80, "now": now,
                                              "exclude_history": False}).json()["items"]
    assert {"3", "15"} <= {g["id"] for g in kept}
    assert client.post("/v1/recommend", json={"history": [], "k": 5}).status_code == 200

    def error(body, status, field):
      r = client.post("/v1/recommend", json=body) if not isinstance(body, str) else \
          client.post("/v1/recommend", content=body, headers=JSON)
      assert r.status_code == status, r.text
      assert r.json()["error"]["field"] == field, r.json()
    error({"history": [{"item_id": "999999", "timestamp": 1}], "now": 2}, 422,
          "history[0].item_id")
    error({"history": history, "now": 1}, 422, "history[0].timestamp")
    error({"history": history, "k": 0}, 422, "k")
    error({"history": [{"item_id": 3, "timestamp": 1}]}, 422, "history[0].item_id")
    error({"history": history, "extra": 1}, 422, "extra")
    error("{not json", 400, None)


def test_resume_reproduces_the_run_exactly(trained, built, tmp_path):
  config, workdir, _ = trained
  copy = str(tmp_path / "resumed")
  shutil.copytree(workdir, copy)
  steps = sorted(int(d) for d in os.listdir(os.path.join(copy, "checkpoints")) if d.isdigit())
  assert steps[-1] == config.train.steps and config.train.checkpoint_every in steps
  for step in steps:
    if step > config.train.checkpoint_every:
      shutil.rmtree(os.path.join(copy, "checkpoints", str(step)))
  summary = twotower.train(config, copy)
  assert summary["resumed_from"] == config.train.checkpoint_every

  def losses(path):   # the LAST logged loss of every step
    with open(os.path.join(path, "train_metrics.jsonl")) as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert losses(copy) == losses(workdir)
  run, state, _, _ = built
  a = restore_for_eval(config, workdir, state)[1].params
  b = restore_for_eval(config, copy, state)[1].params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_SHARDED = r"""
import json, sys
import jax, numpy as np
from configs.twotower_movielens import get_config
from omnisage.data.twotower import examples as mlx
from omnisage.data.twotower import pipeline as tt_pipeline
from omnisage.train import frequency, sharding
from omnisage.train.twotower import trainer as twotower
config = get_config("tiny")
prepared = sys.argv[1]
meta = mlx.read_meta(prepared)
examples = mlx.load_examples(prepared)
# Rows spread over the file (it is sorted by user): many users, so few in-batch masks.
rows = np.linspace(0, len(examples["item"]) - 1, 64).astype(int)
batch = tt_pipeline.GatherBatch(examples, mlx.Catalogue.load(prepared)).map(rows)
out = {}
for data, model in [(1, 1), (4, 2)]:
  config.mesh.data, config.mesh.model = data, model
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: data * model])
  state, statics, _ = twotower.create_twotower_state(config, meta, mesh)
  tables = {jax.tree_util.keystr(p): (str(x.sharding.spec), x.addressable_shards[0].data.shape[0],
                                      x.shape[0])
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
            if "['table']" in jax.tree_util.keystr(p) or "token_weights" in str(p)}
  log_q = jax.numpy.zeros((64,))
  loss = jax.jit(lambda s, st, b: twotower.loss_fn(s.model(st.params), b, log_q, config.loss)[0])(
      statics, state, sharding.shard_batch(mesh, batch))
  out[f"{data}x{model}"] = {"loss": float(loss), "tables": tables}
print(json.dumps(out))
"""


def test_id_tables_shard_over_model_on_a_4x2_mesh(trained):
  config, workdir, _ = trained
  prepared = prepared_dir_of(config, workdir)
  result = subprocess.run([sys.executable, "-c", _SHARDED, prepared], cwd=ROOT,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  tables = out["4x2"]["tables"]
  assert len(tables) == 6   # table + per-id weights: user ids, item ids, title tokens
  for spec, shard_rows, rows in tables.values():
    assert spec == "P('model', None)" and shard_rows == rows // 2
  # The in-batch softmax spans the global batch: the same loss on 1 and on 8 devices.
  assert out["1x1"]["loss"] > 1.0
  assert out["4x2"]["loss"] == pytest.approx(out["1x1"]["loss"], rel=1e-5)


def test_real_movielens_examples_have_no_leakage():
  root = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))
  path = os.path.join(root, "movielens-latest-small")
  if not os.path.isdir(path):
    pytest.skip(f"{path} not found (set OMNISAGE_DATASETS)")
  ml = movielens.load(path)
  cut = movielens.time_split(ml.ratings, 0.8)
  assert ml.movies.num_rows == 9742 and ml.ratings.num_rows == 100_836
  _, genres, _, index_of = mlx.build_catalogue(ml.movies, ml.ratings, cut, tiny_config("").data)
  assert len(genres) == 19 and len(index_of) == 9742   # "(no genres listed)" is no genre
  # The first 60 users only (speed): every example's target is pre-cut, every history strictly
  # older, every evaluation positive post-cut.
  import pyarrow.compute as pc
  some = ml.ratings.filter(pc.less_equal(ml.ratings["user"], 60))
  train, evals, cold = mlx.build_examples(some, index_of, cut, 8, 90.0)
  ts = some["timestamp"].to_numpy()
  assert len(train["item"]) == int((ts < cut).sum())
  ages = np.stack(train["hist_age"])
  assert (ages[np.stack(train["hist_items"]) != 0] > 0).all()
  assert all(t < cut for t in train["timestamp"])
