"""Best Buy loader (omnisage/data/sources/bestbuy.py), its raw tables through prepare, and the
benchmark's code path (benchmarks/bestbuy.py) with the tiny config on a generated slice.

Hand-made files in tmp_path always run; the real-file checks skip when OMNISAGE_DATASETS (default
../shared/datasets) has no bestbuy-acm-small.
"""

import calendar
import gzip
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bestbuy as bench
from configs import omnisage_bestbuy
from omnisage.data import text
from omnisage.data.sources import bestbuy
from omnisage.train.evaluators.corpus import reference_metrics
from tests.helpers import ROOT

DATASETS = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))
REAL = os.path.join(DATASETS, "bestbuy-acm-small")
HEADER = "user,sku,category,query,click_time,query_time"
DAY = 86_400


def utc(s: str) -> int:
  return calendar.timegm((int(s[:4]), int(s[5:7]), int(s[8:10]), int(s[11:13]), int(s[14:16]),
                          int(s[17:19])))


def write_dataset(folder, part_a: list[str], part_b: list[str], names: list[str]) -> str:
  """The three files as the real ones are: gzip, CRLF CSV parts; a LF tsv without header."""
  os.makedirs(folder, exist_ok=True)
  for name, rows in (("train_part_a.csv.gz", part_a), ("train_part_b.csv.gz", part_b)):
    with gzip.open(os.path.join(folder, name), "wb") as f:
      f.write(("\r\n".join([HEADER, *rows]) + "\r\n").encode())
  with open(os.path.join(folder, "sku_name.tsv"), "w") as f:
    f.write("\n".join(names) + "\n")
  return str(folder)


def row(user, sku, query, click, asked=None):
  return f"{user},{sku},abcat0701002,{query},{click},{asked or click}"


NAMES = ["1000001\tGears of War 3", "1000002\tBattlefield 3",
         "1000003\tThe Elder Scrolls V: Skyrim",
         "12ab\tBroken Id",            # malformed_sku
         "1000004\t  ",                # empty_name
         "1000002\tBattlefield 3 Again",   # duplicate_sku (first kept)
         "2147483647\tDigital Only Bundle"]
PART_A = [
    row("u1", "1000001", "gears of war 3", "2011-09-14 12:46:28.66", "2011-09-14 12:45:07.064"),
    row("u1", "1000003", "Sky rim", "2011-10-20 10:00:00.5"),
    row("u1", "1000003", "Skyrim", "2011-10-20 10:01:00"),             # co-click with "Sky rim"
    row("u2", "9999169100050027", "Xbox bundles", "2011-10-30 23:27:43.466"),   # malformed_sku
    row("u2", "100000 1", "x", "2011-10-30 23:27:43"),                   # malformed_sku
    row("u3", "1000002", "bf3", "2011-13-01 00:00:00"),                  # invalid_time (month)
    row("u3", "1000002", "bf3", "2011-10-01 00:00:00", "2011-10-01T00:00:00"),   # invalid_time
    row("u4", "1000002", "  ", "2011-10-01 00:00:00"),                   # empty_query
    row("u5", "2903172", "Minecraft", "2011-10-15 00:01:39.337"),        # unknown_sku
    row("u6", "2903172", "Minecraft", "2011-10-16 00:01:39"),            # unknown_sku
    row("", "1000002", "bf3", "2011-10-01 00:00:00"),                    # missing_user
    "u7,1000002,abcat0701002,bf3,2011-10-01 00:00:00",                   # wrong_field_count
    row("u8", "1000002", "Battlefield 3", "2011-10-25 08:00:00"),
]
PART_B = [
    row("u8", "1000002", "Battlefield 3", "2011-10-25 08:00:00"),        # duplicate_click
    row("u9", "1000002", "battlefield", "2011-10-26 09:30:00.999"),
]


@pytest.fixture
def handmade(tmp_path):
  return write_dataset(tmp_path / "bb", PART_A, PART_B, NAMES)


def test_parse_time():
  assert bestbuy.parse_time("2011-09-14 12:46:28.66") == utc("2011-09-14 12:46:28")
  assert bestbuy.parse_time("2011-09-14 12:46:28") == 1316004388
  for bad in ("2011-02-30 00:00:00", "2011-09-14T12:46:28", "2011-09-14 24:00:00", "", "x",
              "2011-09-14 12:46:28.1234567"):
    assert bestbuy.parse_time(bad) is None, bad


def test_load_handmade_counts_every_bad_row(handmade):
  bb = bestbuy.load(handmade)
  assert dict(bb.bad.counts) == {
      "malformed_sku": 3, "empty_name": 1, "duplicate_sku": 1, "invalid_time": 2,
      "empty_query": 1, "unknown_sku": 2, "missing_user": 1, "wrong_field_count": 1,
      "duplicate_click": 1}
  assert bb.skus.to_pydict() == {
      "sku": ["1000001", "1000002", "1000003", "2147483647"],
      "name": ["Gears of War 3", "Battlefield 3", "The Elder Scrolls V: Skyrim",
               "Digital Only Bundle"]}
  c = bb.clicks.to_pydict()
  # Physical line numbers (header = 1, CRLF counted once) and the part each row came from.
  assert c["line"] == [2, 3, 4, 14, 3]
  assert c["part"] == ["a", "a", "a", "a", "b"]
  assert c["user"] == ["u1", "u1", "u1", "u8", "u9"]
  assert c["query"] == ["gears of war 3", "Sky rim", "Skyrim", "Battlefield 3", "battlefield"]
  assert c["click_time"] == [utc(t) for t in ("2011-09-14 12:46:28", "2011-10-20 10:00:00",
                                              "2011-10-20 10:01:00", "2011-10-25 08:00:00",
                                              "2011-10-26 09:30:00")]
  assert c["query_time"][0] == utc("2011-09-14 12:45:07")
  s = bb.summary()
  assert s["rows_read"] == {"sku_name.tsv": 7, "train_part_a.csv.gz": 13, "train_part_b.csv.gz": 2}
  assert s["clicks"] == 5 and s["skus"] == 4
  assert s["clicked_skus"] == 3 and s["unnamed_clicked_skus"] == 1 and s["unknown_sku_rows"] == 2
  assert s["bad_rows"]["examples"]["unknown_sku"][0].startswith("train_part_a.csv.gz:10: ")


def test_load_refuses_wrong_files(tmp_path, handmade):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    bestbuy.load(str(tmp_path / "nowhere"))
  folder = write_dataset(tmp_path / "hdr", [], [], NAMES)
  with gzip.open(os.path.join(folder, "train_part_b.csv.gz"), "wb") as f:
    f.write(b"user,sku,query\r\n")
  with pytest.raises(ValueError, match="train_part_b.csv.gz: header"):
    bestbuy.load(folder)
  empty = write_dataset(tmp_path / "empty", [], [], NAMES)
  with pytest.raises(ValueError, match="no valid clicks"):
    bestbuy.load(empty)
  os.remove(os.path.join(empty, "sku_name.tsv"))
  with pytest.raises(FileNotFoundError, match="sku_name.tsv: not found"):
    bestbuy.load(empty)


def test_coclick_pairs_same_user_same_sku_distinct_queries(handmade):
  bb = bestbuy.load(handmade)
  q1, q2, ts, info = bestbuy.coclick_pairs(bb.clicks)
  # u1: "Sky rim" then "Skyrim" on the Skyrim sku; u8 and u9 clicked the same sku but are two users.
  assert sorted(zip(q1, q2, ts)) == sorted([("Sky rim", "Skyrim", utc("2011-10-20 10:01:00")),
                                            ("Skyrim", "Sky rim", utc("2011-10-20 10:01:00"))])
  assert info == {"pairs": 2, "skus_with_pairs": 1, "dropped_by_cap": 0}


def test_coclick_pairs_normalise_and_cap(tmp_path):
  rows = [row("u1", "1000001", q, f"2011-09-0{i + 1} 00:00:00")
          for i, q in enumerate(["Gears 3", "GEARS  3", "gears of war", "gow3", "gears 3"])]
  bb = bestbuy.load(write_dataset(tmp_path / "cap", rows, [], NAMES))
  q1, q2, ts, info = bestbuy.coclick_pairs(bb.clicks)
  # "Gears 3", "GEARS  3" and "gears 3" normalise alike: 3 distinct queries, 3 pairs, 6 directed.
  assert info["pairs"] == 6
  assert {text.normalize(a) for a in q1} == {"gears 3", "gears of war", "gow3"}
  # A pair's time is the later of the two queries' FIRST clicks.
  assert dict(zip(zip(map(text.normalize, q1), q2), ts))[("gears 3", "gow3")] == utc(
      "2011-09-04 00:00:00")
  q1, q2, ts, info = bestbuy.coclick_pairs(bb.clicks, max_per_sku=4, seed=1)
  assert info == {"pairs": 4, "skus_with_pairs": 1, "dropped_by_cap": 2} and len(q1) == 4


def generated_world(folder, skus: int = 24, users: int = 700, days: int = 40, seed: int = 0):
  """A small Best Buy-like slice: queries are (typo'd) words of the clicked game's name; users
  sometimes reformulate, which makes co-click pairs in both the train and the eval window."""
  rng = np.random.default_rng(seed)
  words = ["war", "gears", "field", "battle", "skyrim", "dance", "kinect", "madden", "fifa",
           "halo", "reach", "forza", "motor", "racing", "zombie", "ninja", "lego", "batman"]
  names = [f"{1_000_000 + i}\t{' '.join(rng.choice(words, 3, replace=False))} {i}"
           for i in range(skus)]
  start = utc("2011-08-11 00:00:00")
  part_a, part_b = [], []
  popular = rng.zipf(1.5, users) % skus
  for u in range(users):
    sku = int(popular[u])
    name = names[sku].split("\t")[1].split()
    t = start + int(rng.integers(0, days * DAY))
    stamp = lambda x: f"{np.datetime64(x, 's').astype(str).replace('T', ' ')}.5"
    query = " ".join(name[:2]) if rng.random() < 0.5 else name[0][:-1] + " " + name[-1]
    (part_a if u % 5 else part_b).append(row(f"u{u}", 1_000_000 + sku, query, stamp(t)))
    if u % 7 == 0:   # a reformulation of the same search, a minute later
      part_a.append(row(f"u{u}", 1_000_000 + sku, name[1], stamp(t + 60)))
  return write_dataset(folder, part_a, part_b, names)


def load_config(variant):
  return omnisage_bestbuy.get_config(variant)


def test_raw_tables_through_prepare(ray_cluster, tmp_path):
  from omnisage.data.omnisearchsage import prepare
  bb = bestbuy.load(generated_world(tmp_path / "bb"))
  raw = str(tmp_path / "raw")
  written = bestbuy.to_raw_tables(bb, raw)
  n, pairs = bb.clicks.num_rows, written["coclick"]["pairs"]
  assert written["rows"] == {"queries_log": n + pairs, "pins": 0, "products": 24,
                             "board_saves": 0}
  log = pq.read_table(os.path.join(raw, "queries_log.parquet")).to_pydict()
  assert "split" not in log   # prepare's own time split
  assert log["entity_kind"] == ["products"] * n + ["queries"] * pairs
  assert log["engagement"] == ["long_click"] * n + ["click"] * pairs
  assert log["entity_id"][:n] == bb.clicks["sku"].to_pylist()
  assert log["timestamp"][:n] == bb.clicks["click_time"].to_pylist()

  config = load_config("tiny")
  summary = prepare.prepare(config, raw, str(tmp_path / "prepared"))
  # The time split, recomputed: eval = the last eval_days whole UTC days, gap_days before them.
  ts = np.asarray(log["timestamp"])
  kind = np.asarray(log["entity_kind"])
  eval_start = (ts.max() // DAY - config.data.eval_days + 1) * DAY
  train_end = eval_start - config.data.gap_days * DAY
  train, evals = ts < train_end, ts >= eval_start
  assert summary["split"]["eval_start"] == eval_start
  assert summary["pairs"]["eval"] == {"q2pin": 0, "q2product": int((evals & (kind == "products"))
                                      .sum()), "q2query": int((evals & (kind == "queries")).sum())}
  assert summary["pairs"]["train"]["q2query"] == int((train & (kind == "queries")).sum()) > 0
  assert summary["pairs"]["eval"]["q2query"] > 0
  assert summary["entities"] == {"pins": 0, "products": 24,
                                 "queries": len({text.normalize(q) for q in log["query"]})}
  assert summary["features"]["entities_with_engaged_queries"]["products"] > 0


def test_benchmark_tiny_on_a_slice(ray_cluster, tmp_path):
  folder = generated_world(tmp_path / "bb")
  config = load_config("tiny")
  config.train.steps = 4
  config.train.checkpoint_every = 4
  out = bench.run(folder, str(tmp_path / "work"), config)
  assert out["steps"] == 4 and set(out["methods"]) == {"popularity", "bm25", "omnisage"}

  # The eval set and the popularity row, recomputed from the files by plain loops.
  bb = bestbuy.load(folder)
  split = out["split"]
  skus = bb.skus["sku"].to_pylist()
  pos, counts = {}, np.zeros(len(skus))
  for q, s, t in zip(bb.clicks["query"].to_pylist(), bb.clicks["sku"].to_pylist(),
                     bb.clicks["click_time"].to_pylist()):
    if split["eval_start"] <= t < split["eval_end"]:
      pos.setdefault(text.normalize(q), set()).add(skus.index(s))
    if t < split["train_end"]:
      counts[skus.index(s)] += 1
  queries = sorted(pos)
  assert out["eval_queries"] == len(queries) > 0
  assert out["eval_pairs"] == sum(len(p) for p in pos.values())
  scores = np.tile(counts - np.arange(len(skus)) * 1e-6, (len(queries), 1))
  ref = reference_metrics(scores, [pos[q] for q in queries])
  pop = out["methods"]["popularity"]
  assert pop["recall@10"] == pytest.approx(ref["recall@10"])
  assert pop["pair_recall@10"] == pytest.approx(ref["pair_recall@10"])
  # Queries are words of the clicked name: BM25 must beat popularity on 24 skus.
  assert out["methods"]["bm25"]["recall@10"] > pop["recall@10"]
  om = out["methods"]["omnisage"]
  assert 0.0 <= om["recall@10"] <= 1.0 and om["train_seconds"] > 0
  assert om["queries"] == len(queries)


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"{REAL} not present")
def test_real_files_match_source_md():
  bb = bestbuy.load(REAL)
  s = bb.summary()
  # SOURCE.md: 42,365 rows (33,892 + 8,473); 437 named skus; 413 clicked skus of which 21 have
  # no name (300 rows), one of them the malformed id 9999169100050027; no duplicates.
  assert s["rows_read"] == {"sku_name.tsv": 437, "train_part_a.csv.gz": 33_892,
                           "train_part_b.csv.gz": 8_473}   # 42,365 clicks
  assert dict(bb.bad.counts) == {"unknown_sku": 299, "malformed_sku": 1}
  assert s["clicks"] == 42_065 and s["parts"] == {"a": 33_892 - 246, "b": 8_473 - 54}
  assert s["skus"] == 437
  assert s["clicked_skus"] + s["unnamed_clicked_skus"] + 1 == 413
  assert s["clicked_skus"] == 392
  assert s["click_time_utc"] == ["2011-08-11T04:00:17Z", "2011-10-31T10:17:42Z"]
  assert bb.bad.examples["malformed_sku"][0].startswith("train_part_a.csv.gz:25854: ")
  assert s["users"] == 37_769 and s["normalized_queries"] == 4_560
