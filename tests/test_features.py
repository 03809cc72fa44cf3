"""omnisage.data.omnisearchsage.features: board-title ranking, engaged queries (full, incremental),
pair caps."""

import collections
import math

import numpy as np

from omnisage.data.omnisearchsage import features
from omnisage.data.omnisearchsage.log_rows import DAY


def test_board_titles_hand_example():
  titles = [("vegan recipes", 3), ("ideas", 4), ("my favorites", 1), ("vegan food", 1),
            ("recipes", 1), ("!!!", 5)]
  F = dict(vegan=50, recipes=200, ideas=5000, my=3000, favorites=3000, food=400)
  score = lambda c, ws: sum(math.log(F[w]) for w in ws) / len(ws) - math.log(c)
  expected = sorted([("vegan recipes", score(3, ["vegan", "recipes"])),
                     ("ideas", score(4, ["ideas"])),
                     ("my favorites", score(1, ["my", "favorites"])),
                     ("vegan food", score(1, ["vegan", "food"])),
                     ("recipes", score(1, ["recipes"]))], key=lambda x: x[1])
  got = features.select_board_titles(titles, word_freq=F)
  assert got == [t for t, _ in expected]
  # Specific, consensual titles first; the generic ones last; the wordless "!!!" dropped.
  assert got == ["vegan recipes", "vegan food", "recipes", "ideas", "my favorites"]
  assert features.select_board_titles(titles, top=2, word_freq=F) == ["vegan recipes",
                                                                      "vegan food"]


def test_board_titles_ties_duplicates_and_top():
  # Without word frequencies and with equal counts all scores tie: word count desc, then length
  # desc, then text.
  titles = [("pq", 1), ("ab cd", 1), ("xyz", 1), ("long title words", 1), ("abc", 1)]
  assert features.select_board_titles(titles) == ["long title words", "ab cd", "abc", "xyz", "pq"]
  # Repeated titles are summed: "b" (1+2) beats "a" (2).
  assert features.select_board_titles([("a", 2), ("b", 1), ("b", 2)]) == ["b", "a"]
  many = {f"title{i:02d}": i + 1 for i in range(15)}
  got = features.select_board_titles(many, top=10)
  assert got == [f"title{i:02d}" for i in range(14, 4, -1)]


def test_board_titles_per_pin_demotes_generic_titles():
  # Pin 0 was saved twice to "ideas" boards, once to "vegan cake"; nine other pins use "ideas".
  pins = np.array([0, 0, 0] + list(range(1, 10)))
  titles = ["ideas", "ideas", "vegan cake"] + ["ideas"] * 9
  per_pin = features.board_titles_per_pin(pins, titles)
  # ln F(ideas) - ln 2 = ln 11 - ln 2 > 0 = score of "vegan cake" (F = 1, count 1).
  assert per_pin[0] == ["vegan cake", "ideas"]
  assert per_pin[5] == ["ideas"] and len(per_pin) == 10


def test_top_engaged_queries_order():
  counts = {("pin", 0): {"b": 2, "a": 2, "c": 5, "d": 1, "zero": 0}}
  top = features.top_engaged_queries(counts, top=3)
  assert top == {("pin", 0): [("c", 5), ("a", 2), ("b", 2)]}
  table = features.count_engaged_queries([(1, 0), (1, 0), (1, 1)], ["q", "q", "r"])
  assert table == {(1, 0): {"q": 2}, (1, 1): {"r": 1}}


def _random_window(rng, pool, n_keys=4, size=30):
  counts = {}
  for k in range(n_keys):
    qs = rng.choice(pool, size=rng.integers(1, size), p=_zipf(len(pool)))
    counts[k] = dict(collections.Counter(qs.tolist()))
  return counts


def _zipf(n):
  w = 1 / np.arange(1, n + 1)
  return w / w.sum()


def _add(a, b):
  out = {k: collections.Counter(v) for k, v in a.items()}
  for k, v in b.items():
    out.setdefault(k, collections.Counter()).update(v)
  return out


def test_merge_equals_full_recompute_exactly_when_condition_holds():
  rng = np.random.default_rng(0)
  pool = [f"q{i:02d}" for i in range(25)]
  k = 5
  seen = collections.Counter()
  for _ in range(300):
    old, new = _random_window(rng, pool), _random_window(rng, pool)
    stored = features.top_engaged_queries(old, k)
    merged = features.merge_engaged_queries(stored, new, k)
    full = features.top_engaged_queries(_add(old, new), k)
    uncertain = features.uncertain_merge_keys(stored, new, k)
    for key in full:
      kept = {q for q, _ in stored.get(key, [])}
      condition = all(q in kept or old.get(key, {}).get(q, 0) == 0 for q, _ in full[key])
      assert (merged[key] == full[key]) == condition  # the stated iff
      if key not in uncertain:
        assert merged[key] == full[key]  # certified => exact
      seen[condition] += 1
  assert seen[True] > 100 and seen[False] > 20  # both regimes were exercised


def test_merge_exact_when_new_queries_are_stored_or_brand_new():
  # The common case the refresh relies on: a new window only adds counts to stored queries or
  # brings queries never seen before; then the condition holds by construction.
  rng = np.random.default_rng(1)
  for _ in range(100):
    old = _random_window(rng, [f"old{i}" for i in range(20)])
    stored = features.top_engaged_queries(old, 5)
    new = {}
    for key, top in stored.items():
      choices = [q for q, _ in top] + [f"new{i}" for i in range(10)]
      qs = rng.choice(choices, size=20)
      new[key] = dict(collections.Counter(qs.tolist()))
    full = features.top_engaged_queries(_add(old, new), 5)
    assert features.merge_engaged_queries(stored, new, 5) == full


def test_merge_inexact_case_is_flagged():
  old = {"e": {"a": 5, "b": 4, "c": 3}}
  stored = features.top_engaged_queries(old, 2)  # c (3) is cut
  new = {"e": {"c": 3}}
  merged = features.merge_engaged_queries(stored, new, 2)
  full = features.top_engaged_queries(_add(old, new), 2)
  assert full == {"e": [("c", 6), ("a", 5)]}
  assert merged == {"e": [("a", 5), ("b", 4)]}  # c's old count was thrown away
  assert features.uncertain_merge_keys(stored, new, 2) == {"e"}
  # A list that was not full held every old query: always certified (and exact).
  small = features.top_engaged_queries({"e": {"a": 1}}, 2)
  assert features.uncertain_merge_keys(small, {"e": {"z": 9}}, 2) == set()
  assert features.merge_engaged_queries(small, {"e": {"z": 9}}, 2) == {"e": [("z", 9), ("a", 1)]}
  # An outside query is certified out when even its largest possible old count (the smallest
  # stored count, 40) cannot lift it past the merged k-th entry: 40 + 2 < 40 + 10 here, but not
  # when the stored queries gained nothing.
  stored = features.top_engaged_queries({"e": {"a": 50, "b": 40, "c": 1}}, 2)
  assert features.uncertain_merge_keys(stored, {"e": {"b": 10, "c": 2}}, 2) == set()
  assert features.uncertain_merge_keys(stored, {"e": {"c": 2}}, 2) == {"e"}


def test_cap_pairs_counts_determinism_and_uniformity():
  rng = np.random.default_rng(0)
  ids = rng.choice(50, size=3000, p=_zipf(50))
  kept = features.cap_pairs(ids, 20, np.random.default_rng(5))
  assert np.all(np.diff(kept) > 0)
  got = collections.Counter(ids[kept].tolist())
  want = {e: min(c, 20) for e, c in collections.Counter(ids.tolist()).items()}
  assert got == want
  np.testing.assert_array_equal(kept, features.cap_pairs(ids, 20, np.random.default_rng(5)))
  assert not np.array_equal(kept, features.cap_pairs(ids, 20, np.random.default_rng(6)))
  # Each of 10 pairs of one entity survives a cap of 3 with probability 0.3.
  hits = np.zeros(10)
  for seed in range(2000):
    hits[features.cap_pairs(np.zeros(10, int), 3, np.random.default_rng(seed))] += 1
  assert np.abs(hits / 2000 - 0.3).max() < 0.05
  assert features.cap_pairs(np.zeros(0, int), 3, rng).size == 0


def windowed_engaged_queries(log: dict, sel: np.ndarray, top: int, refresh_days: int):
  """The engaged-query refresh of SPEC, key by key, from features.py's rules: the top engaged
  queries per (entity, engagement) over the rows `sel` of the log; with refresh_days > 0 the log
  is cut into windows of that many days, each merged into the stored top lists
  (`merge_engaged_queries`), and the keys whose merge is not certified equal to a full recompute
  are returned too. The reference ray_features.engaged_block is held to
  (tests/test_prepare_ray.py)."""
  def counts(rows):
    return features.count_engaged_queries(
        zip(log["entity"][rows].tolist(), log["engagement"][rows].tolist()),
        log["query"][rows].tolist())
  if not refresh_days:
    return features.top_engaged_queries(counts(sel), top), set()
  window = log["timestamp"] // (refresh_days * DAY)
  current, uncertain = {}, set()
  for w in np.unique(window[sel]):
    new = counts(sel & (window == w))
    uncertain |= features.uncertain_merge_keys(current, new, top)
    current = features.merge_engaged_queries(current, new, top)
  return current, uncertain


def test_prepare_windowed_refresh_equals_full_recompute_where_certified():
  """The n-day refresh: every list not reported as uncertain equals the full recompute; with
  one window (refresh period longer than the log) nothing is uncertain."""
  rng = np.random.default_rng(3)
  for n, top in ((3_000, 20), (20_000, 5)):   # sparse lists (mostly certified), dense lists
    log = {"entity": rng.integers(0, 40, n), "engagement": rng.integers(0, 2, n).astype(str),
           "query": np.array([f"q{int(x)}" for x in rng.zipf(1.3, n) % 300], object),
           "timestamp": rng.integers(0, 60 * DAY, n)}
    sel = np.ones(n, bool)
    full, none = windowed_engaged_queries(log, sel, top, 0)
    assert none == set()
    windowed, uncertain = windowed_engaged_queries(log, sel, top, 7)
    assert set(windowed) == set(full)
    certified = set(full) - uncertain
    if top == 20:
      assert len(certified) > 0
    assert all(windowed[k] == full[k] for k in certified)
    one_window, none = windowed_engaged_queries(log, sel, top, 100)
    assert none == set() and one_window == full
