"""Best Buy mobile-site search clicks (ACM SF hackathon "small", Kaggle 2012): query -> sku clicks.

Real search -> click logs of Xbox 360 games, Aug 11 - Oct 31 2011, with game titles as item text.
See ../shared/datasets/bestbuy-acm-small/SOURCE.md: 42,365 clicks in two disjoint parts, 38,024
users, 437 named skus (392 of the 413 clicked skus have a name).

Files (UTF-8, CRLF, no quote characters):
  train_part_a.csv.gz, train_part_b.csv.gz   user,sku,category,query,click_time,query_time
      query: the raw user text (mixed case, typos; 8 rows hold U+FFFD from the origin's lost
      encoding, kept as they are); times like `2011-09-14 12:46:28.66` (UTC assumed; fractions
      of a second are dropped: timestamps are int64 seconds)
  sku_name.tsv   no header, sku \\t name

Bad rows are dropped and counted by reason: a wrong field count, an empty user (`missing_user`),
a sku id that is not a decimal int32 (`malformed_sku`: one click has `9999169100050027`; the
catalogue's own ids are int32, its placeholder `2147483647` "Digital Only Bundle" included), an
unparseable click or query time (`invalid_time`), an empty query (`empty_query`), an exact repeat
of an earlier (user, sku, query, click_time) (`duplicate_click`: none in the real parts, which do
not overlap) and a click on a sku that has no name (`unknown_sku`: 299 rows on 20 skus, the
malformed one being counted as malformed). In sku_name.tsv: `malformed_sku`, `empty_name` and a
repeated sku (`duplicate_sku`, first kept).

`to_raw_tables` writes the canonical tables that `launch.py prepare` reads: the skus as products,
every click as a query -> product `long_click` (a click after a search is the only engagement these
logs record, and long_click is the closest code of schema.ENGAGEMENTS), and query -> query `click`
co-click pairs (see `coclick_pairs`). No `split` column: prepare's own time split applies.

Usage:
  bb = load("../shared/datasets/bestbuy-acm-small")
  bb.clicks    # line, part, user, sku, query (raw), click_time, query_time
  bb.skus      # sku, name
  bb.summary()
  to_raw_tables(bb, "runs/bestbuy/raw")   # then: launch.py prepare --config.data.raw_dir=...
"""

import collections
import dataclasses
import datetime
import os
import re

import numpy as np
import pyarrow as pa

from omnisage.data import text
from omnisage.data.sources.common import BadRows, read_delimited
from omnisage.data.sources.raw import write_raw_tables

PARTS = {"a": "train_part_a.csv.gz", "b": "train_part_b.csv.gz"}
NAMES = "sku_name.tsv"
HEADER = ("user", "sku", "category", "query", "click_time", "query_time")
SKU = re.compile(r"[0-9]+")   # int() alone would take "+5", " 5", "1_000" and "٣"
INT32_MAX = 2**31 - 1
TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.\d{1,6})?")
# Co-click pairs kept per sku (both directions count): bounds a blockbuster's share of the
# query -> query task. The real logs have far fewer (see to_raw_tables' summary).
MAX_PAIRS_PER_SKU = 2_000


def parse_time(value: str) -> int | None:
  """`2011-09-14 12:46:28.66` -> seconds since the epoch (UTC, fraction dropped); None if bad."""
  m = TIME.fullmatch(value.strip())
  if not m:
    return None
  try:
    t = datetime.datetime(*map(int, m.groups()), tzinfo=datetime.UTC)
  except ValueError:  # month 13, Feb 30, hour 24, ...
    return None
  return int(t.timestamp())


def _sku(value: str) -> str | None:
  """The sku id as canonical decimal text, None when it is not a decimal int32."""
  value = value.strip()
  return str(int(value)) if SKU.fullmatch(value) and int(value) <= INT32_MAX else None


@dataclasses.dataclass
class BestBuy:
  # line int64, part/user/sku/query string, click_time/query_time int64 seconds; file order
  clicks: pa.Table
  skus: pa.Table     # sku string, name string; file order
  bad: BadRows
  path: str          # the dataset folder
  # data rows read per file (valid + bad), and the clicks per sku without a name (unknown_sku)
  rows_read: dict = dataclasses.field(default_factory=dict)
  unnamed: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> dict:
    c = self.clicks
    ts = c["click_time"].to_numpy()
    iso = lambda t: datetime.datetime.fromtimestamp(int(t), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    queries = c["query"].to_pylist()
    unknown = self.bad.counts.get("unknown_sku", 0)
    return {"path": self.path, "rows_read": self.rows_read, "clicks": c.num_rows,
            "skus": self.skus.num_rows, "clicked_skus": len(set(c["sku"].to_pylist())),
            "users": len(set(c["user"].to_pylist())), "raw_queries": len(set(queries)),
            "normalized_queries": len({text.normalize(q) for q in queries}),
            "click_time_utc": [iso(ts.min()), iso(ts.max())] if len(ts) else None,
            "parts": {p: int(np.sum(np.asarray(c["part"].to_pylist()) == p)) for p in PARTS},
            "unknown_sku_rows": unknown, "unnamed_clicked_skus": len(self.unnamed),
            "bad_rows": self.bad.report()}


def _read_names(file: str, bad: BadRows) -> pa.Table:
  skus, names, seen = [], [], set()
  for line, row in read_delimited(file, header=("sku", "name"), delimiter="\t",
                                  has_header=False, bad=bad):
    sku, name = _sku(row["sku"]), row["name"].strip()
    if sku is None:
      bad.add("malformed_sku", file, line, row)
    elif not name:
      bad.add("empty_name", file, line, row)
    elif sku in seen:
      bad.add("duplicate_sku", file, line, row)
    else:
      seen.add(sku)
      skus.append(sku)
      names.append(name)
  return pa.table({"sku": pa.array(skus, pa.string()), "name": pa.array(names, pa.string())})


def load(path: str) -> BestBuy:
  """Reads the dataset folder `path` (both parts and sku_name.tsv)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory (expected the bestbuy-acm-small folder)")
  bad = BadRows()
  skus = _read_names(os.path.join(path, NAMES), bad)
  rows_read = {NAMES: skus.num_rows + bad.total}
  named = set(skus["sku"].to_pylist())
  cols = collections.defaultdict(list)
  seen: set[tuple] = set()
  unnamed: collections.Counter = collections.Counter()
  for part, name in PARTS.items():
    file = os.path.join(path, name)
    before = len(cols["line"]) + bad.total
    for line, row in read_delimited(file, header=HEADER, bad=bad):
      user, sku, query = row["user"].strip(), _sku(row["sku"]), row["query"]
      click, asked = parse_time(row["click_time"]), parse_time(row["query_time"])
      if not user:
        reason = "missing_user"
      elif sku is None:
        reason = "malformed_sku"
      elif click is None or asked is None:
        reason = "invalid_time"
      elif not query.strip():
        reason = "empty_query"
      elif (key := (user, sku, query, row["click_time"].strip())) in seen:
        reason = "duplicate_click"
      elif sku not in named:
        reason = "unknown_sku"
        unnamed[sku] += 1
      else:
        reason = None
        seen.add(key)
      if reason:
        bad.add(reason, file, line, row)
        continue
      for k, v in (("line", line), ("part", part), ("user", user), ("sku", sku),
                   ("query", query), ("click_time", click), ("query_time", asked)):
        cols[k].append(v)
    rows_read[name] = len(cols["line"]) + bad.total - before
  if not cols["line"]:
    raise ValueError(f"{path}: no valid clicks; bad rows: {dict(bad.counts)}")
  clicks = pa.table({
      "line": pa.array(np.asarray(cols["line"], np.int64)),
      **{k: pa.array(cols[k], pa.string()) for k in ("part", "user", "sku", "query")},
      **{k: pa.array(np.asarray(cols[k], np.int64)) for k in ("click_time", "query_time")}})
  return BestBuy(clicks, skus, bad, path, rows_read, unnamed)


def coclick_pairs(clicks: pa.Table, max_per_sku: int = MAX_PAIRS_PER_SKU, seed: int = 0
                  ) -> tuple[list, list, list, dict]:
  """Query -> query co-click pairs: (q1, q2, time) lists plus counts.

  A pair is two DIFFERENT normalised queries with which the SAME user clicked the SAME sku: the
  user reformulated (a typo fixed, a shorter name) and found the same game, so the two queries
  mean the same thing. Same-user only: across users, every pair of queries of a popular game would
  pair up (quadratic in its clicks). Both directions are emitted; the time is the later of the two
  queries' first clicks (the pair exists only once both happened, so it never leaks eval-window
  clicks into training). Per sku at most `max_per_sku` pairs are kept (a seeded random subset).
  The real logs give only 100 directed pairs (50 reformulations, 26 skus; 48 fall in the default
  train window, 50 in eval, 2 in the gap): most users click once, so the cap never bites there.
  """
  first: dict[tuple, dict[str, tuple[int, str]]] = collections.defaultdict(dict)
  for user, sku, q, t in zip(clicks["user"].to_pylist(), clicks["sku"].to_pylist(),
                             clicks["query"].to_pylist(), clicks["click_time"].to_pylist()):
    norm = text.normalize(q)
    group = first[(user, sku)]
    if norm not in group or t < group[norm][0]:
      group[norm] = (t, q)   # the raw text goes to the log; prepare normalises it again
  per_sku = collections.defaultdict(list)
  for (_, sku), group in first.items():
    items = sorted(group.items())
    for i, (_, (t1, q1)) in enumerate(items):
      for _, (t2, q2) in items[i + 1:]:
        per_sku[sku] += [(q1, q2, max(t1, t2)), (q2, q1, max(t1, t2))]
  rng = np.random.default_rng(seed)
  out, capped = [], 0
  for sku in sorted(per_sku):
    pairs = per_sku[sku]
    if len(pairs) > max_per_sku:
      capped += len(pairs) - max_per_sku
      pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), max_per_sku, replace=False))]
    out += pairs
  q1, q2, ts = (list(x) for x in zip(*out)) if out else ([], [], [])
  return q1, q2, ts, {"pairs": len(out), "skus_with_pairs": len(per_sku),
                      "dropped_by_cap": capped}


def to_raw_tables(bb: BestBuy, out_dir: str, max_pairs_per_sku: int = MAX_PAIRS_PER_SKU,
                  seed: int = 0) -> dict:
  """Writes queries_log/products (pins and board_saves empty) for prepare; returns counts."""
  c = bb.clicks
  n = c.num_rows
  q1, q2, pair_ts, pairs = coclick_pairs(c, max_pairs_per_sku, seed)
  log = {"query": c["query"].to_pylist() + q1,
         "entity_kind": ["products"] * n + ["queries"] * len(q1),
         "entity_id": c["sku"].to_pylist() + q2,
         "engagement": ["long_click"] * n + ["click"] * len(q1),
         "timestamp": np.concatenate([c["click_time"].to_numpy(),
                                      np.asarray(pair_ts, np.int64)])}
  products = {"id": bb.skus["sku"].to_pylist(), "title": bb.skus["name"].to_pylist()}
  rows = write_raw_tables(out_dir, products=products, queries_log=log)
  return {"raw_dir": out_dir, "rows": rows, "clicks": n, "coclick": pairs}
