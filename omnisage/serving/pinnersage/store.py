"""Durable per-user state of the PinnerSage online service (SPEC §4, "Updates").

PinnerSage (Pal et al., KDD 2020) keeps a user's clusters fresh between two daily batch runs with
an online pass over today's actions. An update the service has acknowledged must survive a crash:
the service writes the user's new state here BEFORE it answers, and reads it back after a
restart. The interface is a key-value one on purpose (get/put of one user's record, plus a scan
that only the daily reconcile needs), so a key-value service can replace SQLite at scale.

A record is a JSON-able dict: the batch it continues ("batch"), the user's clustered actions in
time order ("item_ids", "times" unix seconds, "labels" canonical clusters) and the "now" its
importances were measured at. Item ids, not embedding rows: rows change with the embedding table.

`SQLiteStore` is SQLite (stdlib sqlite3) in WAL mode with synchronous=FULL: each put is one
transaction that is on disk when put returns, so a SIGKILL (or a power cut) after the answer
loses nothing; readers never block the writer. `MemoryStore` is the same interface in a dict.

Usage:
  store = SQLiteStore("runs/pinnersage/online.sqlite")
  store.put("u1", {"batch": "...", "item_ids": ["9"], "times": [1700000000], "labels": [0],
                   "now": 1700000000}); store.get("u1")
"""

import json
import os
import sqlite3
import threading
from typing import Iterator, Protocol


class StateStore(Protocol):
  """What the service needs of a store: one user's record in, one out, and a scan of users."""

  def get(self, user_id: str) -> dict | None: ...

  def put(self, user_id: str, record: dict) -> None: ...

  def put_many(self, records: dict) -> None: ...

  def users(self) -> Iterator[str]: ...


class MemoryStore:
  """The interface over a dict (tests, or a service that accepts losing updates on restart)."""

  def __init__(self):
    self.records: dict = {}

  def get(self, user_id: str) -> dict | None:
    record = self.records.get(user_id)
    return None if record is None else json.loads(record)

  def put(self, user_id: str, record: dict) -> None:
    self.records[user_id] = json.dumps(record)   # a copy, as a real store would keep

  def put_many(self, records: dict) -> None:
    for user_id, record in records.items():
      self.put(user_id, record)

  def users(self) -> Iterator[str]:
    return iter(sorted(self.records))


class SQLiteStore:
  """One SQLite file in WAL mode; every put is durable when it returns (synchronous=FULL)."""

  def __init__(self, path: str):
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise FileNotFoundError(f"{path}: directory {parent} does not exist")
    self.path = path
    self.lock = threading.Lock()   # one connection shared by the service's worker threads
    try:
      # isolation_level=None: no implicit transactions; each put is its own committed statement.
      self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
      mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
      self.db.execute("PRAGMA synchronous=FULL")
      self.db.execute("CREATE TABLE IF NOT EXISTS user_state (user_id TEXT PRIMARY KEY, "
                      "record TEXT NOT NULL)")
    except sqlite3.DatabaseError as error:
      raise ValueError(f"{path}: not a usable SQLite state store ({error})") from error
    if mode.lower() != "wal":
      raise ValueError(f"{path}: SQLite refused WAL mode (journal_mode={mode})")

  def get(self, user_id: str) -> dict | None:
    with self.lock:
      row = self.db.execute("SELECT record FROM user_state WHERE user_id = ?",
                            (user_id,)).fetchone()
    return None if row is None else json.loads(row[0])

  def put(self, user_id: str, record: dict) -> None:
    text = json.dumps(record)
    with self.lock:
      self.db.execute("INSERT OR REPLACE INTO user_state (user_id, record) VALUES (?, ?)",
                      (user_id, text))

  def put_many(self, records: dict) -> None:
    """All records in one transaction (the daily reconcile): all or none are written."""
    rows = [(u, json.dumps(r)) for u, r in records.items()]
    with self.lock:
      self.db.execute("BEGIN IMMEDIATE")
      try:
        self.db.executemany("INSERT OR REPLACE INTO user_state (user_id, record) VALUES (?, ?)",
                            rows)
      except BaseException:
        self.db.execute("ROLLBACK")
        raise
      self.db.execute("COMMIT")

  def users(self) -> Iterator[str]:
    with self.lock:
      rows = self.db.execute("SELECT user_id FROM user_state ORDER BY user_id").fetchall()
    return iter([r[0] for r in rows])

  def close(self) -> None:
    with self.lock:
      self.db.close()
