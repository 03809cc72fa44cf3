"""`launch.py serve` of a two-tower bundle with PinnerSage's routes and a durable state store
(configs/serve.py `pinnersage_state_db`): a real server on loopback takes online updates, is
killed with SIGKILL, restarts on the same SQLite file and still answers with every update."""

import os

import httpx
import numpy as np
import pytest

from configs import serve as serve_config
from omnisage.data.twotower import prepare as tt_prepare
from omnisage.serving.index.scann_index import build_index, load_index
from omnisage.serving.pinnersage import batch as ps_batch
from omnisage.serving.pinnersage import service as ps
from omnisage.serving.twotower import bundle as tt_bundle
from omnisage.serving.twotower.service import serve_config as twotower_serve_config
from omnisage.train.twotower import trainer as twotower
from tests.helpers import ROOT, free_port, last_json, run_launch, sigkill, start_served, stop
from tests.test_pinnersage import DAY, write_actions
from tests.test_twotower import tiny_config, write_movielens

T0 = 1_000_000_000 + 200 * DAY   # after the synthetic ratings of write_movielens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny two-tower bundle, its item embeddings and index, and a PinnerSage batch output."""
  root = tmp_path_factory.mktemp("pinnersage_serve")
  write_movielens(root / "ml")
  config = tiny_config(root / "ml")
  workdir = str(root / "run")
  tt_prepare.prepare(config, workdir)
  twotower.train(config, workdir)
  bundle = str(root / "bundle")
  tt_bundle.export(config, workdir, bundle)
  embeddings, index = str(root / "emb"), str(root / "index")
  out = run_launch("embed", f"--config={ROOT}/configs/twotower_movielens.py:tiny",
                   f"--workdir={workdir}", f"--bundle={bundle}",
                   f"--entities={bundle}/items.parquet", f"--out={embeddings}")
  assert out.returncode == 0, out.stderr[-3000:]
  build_index(embeddings, index, qps_seconds=0.05)
  ids = ps_batch.read_items(embeddings).ids
  rng = np.random.default_rng(0)
  actions = [(f"u{u}", ids[int(rng.integers(len(ids)))], int(T0 - rng.integers(0, 60 * DAY)))
             for u in range(8) for _ in range(int(rng.integers(2, 12)))]
  write_actions(root / "actions.parquet", actions)
  batch = str(root / "batch")
  ps_batch.run_batch(embeddings, str(root / "actions.parquet"), batch, alpha=0.9, now=T0)
  return {"root": root, "bundle": bundle, "embeddings": embeddings, "index": index,
          "batch": batch, "ids": list(ids)}


def start_serve(world, port, state_db):
  flags = [f"--config.bundle={world['bundle']}", f"--config.index={world['index']}",
           f"--config.port={port}", f"--config.pinnersage={world['batch']}",
           f"--config.item_embeddings={world['embeddings']}"]
  if state_db is not None:
    flags.append(f"--config.pinnersage_state_db={state_db}")
  return start_served(["launch.py", "serve", *flags], port, "launch.py serve")


def recommend_all(url, users):
  with httpx.Client(base_url=url, timeout=30) as client:
    out = {}
    for user in users:
      r = client.post("/v1/pinnersage/recommend", json={"user_id": user, "k": 20, "seed": 1})
      out[user] = (r.status_code, r.json())
    return out


def test_launch_serve_keeps_pinnersage_updates_across_sigkill(world, tmp_path):
  ids = world["ids"]
  rng = np.random.default_rng(1)
  requests = []
  for step in range(24):
    user = f"u{step % 10}"   # u8 and u9 exist only online
    acts = [{"item_id": ids[int(rng.integers(len(ids)))], "timestamp": T0 + step * 60 + j}
            for j in range(int(rng.integers(1, 4)))]
    requests.append({"user_id": user, "actions": acts, "now": T0 + DAY})
  users = sorted({b["user_id"] for b in requests})
  # The reference: the same updates in process on the same index, never killed.
  reference = ps.PinnerSageService.load(world["batch"], world["embeddings"],
                                        index=load_index(world["index"])["items"])
  for body in requests:
    reference.update(body["user_id"], [(a["item_id"], a["timestamp"]) for a in body["actions"]],
                     now=body["now"])
  expect = {u: reference.recommend(u, 20, seed=1) for u in users}

  db = str(tmp_path / "online.sqlite")
  process, url = start_serve(world, free_port(), db)
  try:
    with httpx.Client(base_url=url, timeout=30) as client:
      for body in requests:
        r = client.post("/v1/pinnersage/update", json=body)
        assert r.status_code == 200, r.text   # acknowledged
      assert client.post("/v1/recommend", json={"history": [], "k": 3}).status_code == 200
    served = recommend_all(url, users)
    assert served == {u: (200, e) for u, e in expect.items()}
    sigkill(process)   # no shutdown handler runs
  finally:
    stop(process)

  process, url = start_serve(world, free_port(), db)
  try:
    assert recommend_all(url, users) == {u: (200, e) for u, e in expect.items()}
  finally:
    stop(process)

  # Without the store a restart serves the batch output alone: the online-only users are gone,
  # which is what the state db is for.
  process, url = start_serve(world, free_port(), None)
  try:
    plain = recommend_all(url, ["u8", "u9"])
    assert {u: status for u, (status, _) in plain.items()} == {"u8": 404, "u9": 404}
  finally:
    stop(process)


def test_state_db_config_default_and_misuse(world, tmp_path):
  config = serve_config.get_config()
  assert config.pinnersage_state_db == ""   # in memory unless named
  config.bundle, config.index = world["bundle"], world["index"]
  config.pinnersage_state_db = str(tmp_path / "s.sqlite")
  with pytest.raises(ValueError, match="pinnersage_state_db"):
    twotower_serve_config(config)   # a store without a batch output to continue
  assert not os.path.exists(tmp_path / "s.sqlite")
  # Through launch.py: a store whose directory does not exist is exit 2, before serving.
  result = run_launch("serve", f"--config.bundle={world['bundle']}",
                      f"--config.index={world['index']}", f"--config.port={free_port()}",
                      f"--config.pinnersage={world['batch']}",
                      f"--config.item_embeddings={world['embeddings']}",
                      f"--config.pinnersage_state_db={tmp_path / 'no' / 'such' / 's.sqlite'}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "does not exist" in last_json(result)["serve"]["error"]
