"""Entity enrichment features and pair caps (SPEC §1 "Features that enrich entities").

- Board titles: per pin, at most 10 unique titles of the boards it was saved to, ranked by a score
  of per-pin title frequency and global word commonness (the formula is in `select_board_titles`).
- Engaged queries: per entity and engagement type, the top-20 queries by count, with an incremental
  refresh that merges a new log window into the stored top-20 (`merge_engaged_queries`).
- Pair caps: at most `cap` training pairs per entity, against popularity bias.

No TensorFlow here. Usage:
  titles = select_board_titles([("vegan recipes", 3), ("my stuff", 1)], top=10)
"""

import collections
import math
from collections.abc import Hashable, Iterable, Mapping

import numpy as np

from omnisage.data import text

# An engaged-queries list: (query, count) pairs sorted by count descending, then query ascending.
TopList = list[tuple[str, int]]


def _rank_key(item: tuple[str, int]):
  return (-item[1], item[0])


# --- board titles ---------------------------------------------------------------------------------
def select_board_titles(titles_with_counts: Iterable[tuple[str, int]] | Mapping[str, int],
                        top: int = 10, word_freq: Mapping[str, int] | None = None) -> list[str]:
  """The board titles a pin keeps, best first (titles are expected to be normalised already).

  Inputs are (title, count) with count c(t) = how many times this pin was saved to a board with
  that title (repeated titles are summed), and `word_freq` F(w) = in how many saves of ALL pins
  the word w occurs in the board title (`board_titles_per_pin` computes it; None: every F is 1).
  Titles without any word are dropped (they yield no tokens). The score is

      score(t) = mean over the distinct words w of t of ln F(w)  -  ln c(t)

  and titles are sorted by (score ascending, word count descending, character length descending,
  title ascending); the first `top` are kept. Ascending score therefore means: titles that many
  savers of THIS pin chose (consensus, -ln c) and whose words are rare across all boards
  (specific, an IDF-like term) come first; generic titles made of everywhere-common words ("ideas",
  "my favorites") come last unless this pin's savers used them much more often. One unit of
  log-commonness trades against a factor e in per-pin count. The tie-breaks prefer the more
  specific (longer) title and finally the alphabetically first, so the result never depends on
  input order.
  """
  items = titles_with_counts.items() if isinstance(titles_with_counts, Mapping) else (
      titles_with_counts)
  counts: collections.Counter = collections.Counter()
  for title, c in items:
    if c > 0 and text.words(title):
      counts[title] += int(c)
  freq = word_freq or {}

  def key(t: str):
    ws = text.words(t)
    distinct = set(ws)
    commonness = sum(math.log(max(freq.get(w, 1), 1)) for w in distinct) / len(distinct)
    return (commonness - math.log(counts[t]), -len(ws), -len(t), t)

  return sorted(counts, key=key)[:top]


def board_titles_per_pin(pin_index: np.ndarray, titles: list[str], top: int = 10
                         ) -> dict[int, list[str]]:
  """`select_board_titles` for every pin of a board-save table (one row per save).

  F(w) is counted over the saves given here (prepare passes the train window only).
  """
  per_pin: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for p, t in zip(np.asarray(pin_index).tolist(), titles):
    per_pin[p][t] += 1
  word_freq: collections.Counter = collections.Counter()
  for t, c in collections.Counter(titles).items():
    for w in set(text.words(t)):
      word_freq[w] += c
  return {p: select_board_titles(c, top, word_freq) for p, c in per_pin.items()}


# --- engaged queries -----------------------------------------------------------------------------
def count_engaged_queries(keys: Iterable[Hashable], queries: Iterable[str]
                          ) -> dict[Hashable, collections.Counter]:
  """Counts table {key: {query: count}} from parallel columns; key is e.g. (entity, engagement)."""
  table: dict[Hashable, collections.Counter] = collections.defaultdict(collections.Counter)
  for k, q in zip(keys, queries):
    table[k][q] += 1
  return dict(table)


def _top_list(counts: Mapping[str, int], top: int) -> TopList:
  return sorted(((q, int(c)) for q, c in counts.items() if c > 0), key=_rank_key)[:top]


def top_engaged_queries(counts_table: Mapping[Hashable, Mapping[str, int]], top: int = 20
                        ) -> dict[Hashable, TopList]:
  """Full recompute: per key, the `top` queries by count descending, ties by query ascending.

  Counts are stored with the list because the incremental refresh needs them.
  """
  return {k: _top_list(c, top) for k, c in counts_table.items()}


def merge_engaged_queries(current_top: Mapping[Hashable, TopList],
                          new_window_counts: Mapping[Hashable, Mapping[str, int]], top: int = 20
                          ) -> dict[Hashable, TopList]:
  """Incremental refresh (SPEC): stored top list + counts of a new, disjoint log window.

  A query's merged count is its stored count (0 if it is not in the stored list) plus its count in
  the new window; the result is the top `top` of those.

  When it equals a full recompute over all the logs. Let the stored list be the exact top-k of the
  old logs (true by induction if every previous refresh was exact), windows be disjoint and counts
  only ever be added (no expiry of old logs). Stored queries then carry exact totals, and a query
  that was cut from the stored list carries only its new-window count, an underestimate by its old
  count c_old(q) <= m, where m is the smallest stored count. Hence:

    merge == full recompute  <=>  every query in the full top-k either is in the stored list or has
                                  c_old(q) == 0 (it never engaged in the old logs).

  (=>: such a query would appear with a too-small count or be missing.) The condition involves old
  counts that were thrown away, so it cannot be checked from the stored data alone; a sufficient
  check that can is `uncertain_merge_keys`. If the stored list held fewer than k queries it held
  every old query and the merge is exact. Counts ranked in from outside the list are the error mode
  (a query that was 21st for months and then gets a few new engagements is under-counted).
  """
  merged = {}
  for k in set(current_top) | set(new_window_counts):
    counts = collections.Counter(dict(current_top.get(k, ())))
    counts.update(new_window_counts.get(k, {}))
    merged[k] = _top_list(counts, top)
  return merged


def uncertain_merge_keys(current_top: Mapping[Hashable, TopList],
                         new_window_counts: Mapping[Hashable, Mapping[str, int]],
                         top: int = 20) -> set:
  """Keys whose merge is NOT certified equal to a full recompute.

  A key is certified when its stored list was not full (it held every old query), or when every
  new-window query q outside the stored list would still rank after the merged k-th entry even with
  the largest old count it could have had, m (the smallest stored count): (m + c_new(q), q) ranks
  after the k-th merged (count, query). Certified => exact; not certified does not imply inexact.
  """
  merged = merge_engaged_queries(current_top, new_window_counts, top)
  uncertain = set()
  for k, new_counts in new_window_counts.items():
    stored = current_top.get(k, [])
    if len(stored) < top:
      continue
    m = stored[-1][1]
    kth = _rank_key(merged[k][-1])
    stored_queries = {q for q, _ in stored}
    for q, c in new_counts.items():
      if c > 0 and q not in stored_queries and _rank_key((q, m + c)) <= kth:
        uncertain.add(k)
        break
  return uncertain


# --- pair caps ------------------------------------------------------------------------------------
def cap_pairs(entity_ids: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
  """Indices (ascending) of the pairs kept: a uniformly random subset of at most `cap` per entity.

  Deterministic given the generator state. Vectorised: shuffle, group by entity with a stable sort,
  and keep the first `cap` of each group.
  """
  entity_ids = np.asarray(entity_ids)
  n = entity_ids.shape[0]
  if n == 0:
    return np.zeros(0, np.int64)
  perm = rng.permutation(n)
  order = perm[np.argsort(entity_ids[perm], kind="stable")]
  sorted_ids = entity_ids[order]
  starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
  group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
  rank = np.arange(n) - group_start
  return np.sort(order[rank < cap])
