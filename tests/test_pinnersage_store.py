"""PinnerSage's durable online state (serving/pinnersage/store.py): the SQLite store itself, a
restarted service that reads acknowledged updates back, a new batch that keeps later updates, and
a real server on loopback killed with SIGKILL and restarted."""

import os
import sqlite3

import httpx
import numpy as np
import pytest

from omnisage.serving.pinnersage import batch as ps_batch
from omnisage.serving.pinnersage import service as ps
from omnisage.serving.pinnersage.store import MemoryStore, SQLiteStore
from tests.helpers import free_port, sigkill, start_served, stop
from tests.test_pinnersage import DAY, T0, random_actions, write_actions, write_items


def test_sqlite_store_round_trip_wal_and_reopen(tmp_path):
  path = str(tmp_path / "state.sqlite")
  store = SQLiteStore(path)
  record = {"batch": "b", "item_ids": ["a", "b"], "times": [1, 2], "labels": [0, 0], "now": 3}
  assert store.get("u1") is None
  store.put("u1", record)
  store.put_many({"u2": {**record, "now": 4}, "u3": {**record, "now": 5}})
  store.put("u1", {**record, "now": 9})   # replaces
  assert store.get("u1")["now"] == 9 and store.get("u3")["now"] == 5
  assert list(store.users()) == ["u1", "u2", "u3"]
  # WAL mode is a property of the file: a fresh connection sees it, and the data.
  other = sqlite3.connect(path)
  assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  assert other.execute("SELECT count(*) FROM user_state").fetchone()[0] == 3
  other.close()
  store.close()
  assert SQLiteStore(path).get("u2")["now"] == 4


def test_sqlite_store_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    SQLiteStore(str(tmp_path / "missing" / "state.sqlite"))
  junk = tmp_path / "junk.sqlite"
  junk.write_bytes(b"this is not a database" * 100)
  with pytest.raises(ValueError, match="junk.sqlite"):
    SQLiteStore(str(junk))


def batch_world(tmp_path, rng, name="b0", now=T0, extra=()):
  """Items, a batch output over random actions (+ extra rows), its directory."""
  items_path = str(tmp_path / "items.parquet")
  if not os.path.exists(items_path):
    write_items(items_path, rng)
  ids = [f"item{i}" for i in range(300)]
  actions = random_actions(np.random.default_rng(4), ids) + list(extra)
  write_actions(tmp_path / f"{name}.parquet", actions)
  out = str(tmp_path / name)
  ps_batch.run_batch(items_path, str(tmp_path / f"{name}.parquet"), out, alpha=0.9, now=now)
  return items_path, ids, out


def snapshot(service, user):
  s = service.states[user]
  return (s.rows.tolist(), s.times.tolist(), s.clusters.labels.tolist(),
          s.clusters.medoids.tolist(), s.clusters.importance.tolist())


@pytest.mark.parametrize("make_store", ["memory", "sqlite"])
def test_restarted_service_reads_acknowledged_updates(tmp_path, make_store):
  rng = np.random.default_rng(8)
  items_path, ids, out = batch_world(tmp_path, rng)
  store = MemoryStore() if make_store == "memory" else SQLiteStore(str(tmp_path / "s.sqlite"))
  first = ps.PinnerSageService.load(out, items_path, store=store)
  untouched = snapshot(first, "u5")
  updates = [("u0", [(ids[3], T0 + 100), (ids[7], T0 + 200)]), ("new", [(ids[9], T0 + 50)]),
             ("u0", [(ids[11], T0 + 300), ("unknown", T0 + 301)]), ("u2", [(ids[1], T0 + 9)])]
  for user, acts in updates:
    first.update(user, acts, now=T0 + DAY)
  if make_store == "sqlite":
    store = SQLiteStore(str(tmp_path / "s.sqlite"))   # a new process would open it anew
  second = ps.PinnerSageService.load(out, items_path, store=store)
  for user in ("u0", "new", "u2"):
    assert second.has_user(user)
    assert snapshot(second, user) == snapshot(first, user)
  assert snapshot(second, "u5") == untouched
  assert not second.has_user("ghost")
  # Without the store the online updates are gone: the check above is not vacuous.
  bare = ps.PinnerSageService.load(out, items_path)
  assert not bare.has_user("new")
  bare_u0 = len(bare.states["u0"].rows) if bare.has_user("u0") else 0
  assert bare_u0 == len(first.states["u0"].rows) - 3
  # Updates after the restart continue from the restored state.
  second.update("u0", [(ids[20], T0 + 400)], now=T0 + DAY)
  first.update("u0", [(ids[20], T0 + 400)], now=T0 + DAY)
  assert snapshot(second, "u0") == snapshot(first, "u0")


def test_new_batch_keeps_updates_acknowledged_after_it(tmp_path):
  """A record made on batch b0 meets batch b1 (now = T0 + 1 day): the actions the record holds
  that are later than b1's now are folded onto b1's state; the earlier ones b1 already has."""
  rng = np.random.default_rng(9)
  items_path, ids, b0 = batch_world(tmp_path, rng)
  store = MemoryStore()
  service = ps.PinnerSageService.load(b0, items_path, store=store)
  early = [(ids[5], T0 + 3600)]            # before b1's now: b1 read it from the actions log
  late = [(ids[6], T0 + 2 * DAY), (ids[8], T0 + 2 * DAY + 5)]   # after b1's now
  service.update("u1", early, now=T0 + 2 * DAY)
  service.update("u1", late, now=T0 + 2 * DAY + 10)
  _, _, b1 = batch_world(tmp_path, rng, "b1", now=T0 + DAY,
                         extra=[("u1", i, t) for i, t in early])
  reloaded = ps.PinnerSageService.load(b1, items_path, store=store)
  expect = ps.PinnerSageService.load(b1, items_path)   # b1 + the late actions, folded online
  expect.update("u1", late, now=T0 + 2 * DAY + 10)
  assert reloaded.has_user("u1")
  assert snapshot(reloaded, "u1") == snapshot(expect, "u1")
  assert expect.items.row[ids[5]] in reloaded.states["u1"].rows   # from b1, not folded twice
  assert reloaded.states["u1"].rows.tolist().count(expect.items.row[ids[5]]) == \
      expect.states["u1"].rows.tolist().count(expect.items.row[ids[5]])


def test_reconcile_writes_every_user(tmp_path):
  rng = np.random.default_rng(10)
  items_path, ids, out = batch_world(tmp_path, rng)
  store = MemoryStore()
  service = ps.PinnerSageService.load(out, items_path, store=store)
  service.update("fresh", [(ids[2], T0 + 10)], now=T0 + DAY)
  restarted = ps.PinnerSageService.load(out, items_path, store=store)
  restarted.reconcile(now=T0 + 2 * DAY)   # must see "fresh", known only to the store
  assert "fresh" in restarted.states
  assert set(store.users()) == set(restarted.states)
  again = ps.PinnerSageService.load(out, items_path, store=store)
  for user in restarted.states:
    assert again.has_user(user) and snapshot(again, user) == snapshot(restarted, user)


# --- a real server, SIGKILL, restart -----------------------------------------------------------

def start_server(out, items_path, db, port):
  return start_served(["-m", "omnisage.serving.pinnersage.service", f"--batch-dir={out}",
                       f"--item-embeddings={items_path}", f"--state-db={db}", f"--port={port}"],
                      port, "the PinnerSage service", timeout=120)


def test_sigkill_and_restart_keeps_every_acknowledged_update(tmp_path):
  rng = np.random.default_rng(12)
  items_path, ids, out = batch_world(tmp_path, rng)
  db = str(tmp_path / "online.sqlite")
  # The reference: the same updates applied in process, never killed.
  reference = ps.PinnerSageService.load(out, items_path)
  requests = []
  for step in range(40):
    user = f"u{step % 14}"   # users 12 and 13 exist only online
    acts = [{"item_id": ids[int(rng.integers(len(ids)))], "timestamp": T0 + step * 60 + j}
            for j in range(int(rng.integers(1, 4)))]
    requests.append({"user_id": user, "actions": acts, "now": T0 + DAY})
  process, url = start_server(out, items_path, db, free_port())
  try:
    with httpx.Client(base_url=url, timeout=30) as client:
      for body in requests:
        r = client.post("/v1/pinnersage/update", json=body)
        assert r.status_code == 200, r.text   # acknowledged
        reference.update(body["user_id"], [(a["item_id"], a["timestamp"]) for a in body["actions"]],
                         now=body["now"])
    sigkill(process)   # no shutdown handler runs
  finally:
    stop(process)
  process, url = start_server(out, items_path, db, free_port())
  try:
    with httpx.Client(base_url=url, timeout=30) as client:
      for user in sorted({b["user_id"] for b in requests}):
        r = client.post("/v1/pinnersage/recommend", json={"user_id": user, "k": 50, "seed": 3})
        assert r.status_code == 200, (user, r.text)
        assert r.json() == reference.recommend(user, 50, seed=3), user
      # And it goes on accepting updates on top of the restored state.
      body = {"user_id": "u13", "actions": [{"item_id": ids[0], "timestamp": T0 + 9999}],
              "now": T0 + DAY}
      got = client.post("/v1/pinnersage/update", json=body).json()
      assert got == reference.update("u13", [(ids[0], T0 + 9999)], now=T0 + DAY)
  finally:
    stop(process)
