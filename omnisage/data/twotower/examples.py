"""MovieLens -> home-feed two-tower examples, item catalogue and evaluation users (SPEC §3).

Engagement: every rating is an engagement, whatever its value. MovieLens only records what a user
chose to rate, so a rating (even a low one) says the user watched the film: that is the home-feed
signal of "engaged with" rather than "liked". Thresholding (e.g. >= 4) would drop ~half of the
already small data and turn the task into rating prediction.

Global time split (`movielens.time_split`, quantile `data.split_quantile`): ratings before the cut
make the training examples; each evaluation user's items at or after the cut are the positives.
`data.split = "per_user"` builds the same layout on the per-user protocol instead
(user_protocol.py: every user's last 20% held out; below, "the cut" is then the stage's history).

Training example = one pre-cut rating (u, i, t): the user's history STRICTLY before t (ratings at
the same second are not history: they may be the same bulk-rating session as the target) -> item i:
  hist_items [H]  catalogue indices of the last H items, most recent first, 0 = padding
  hist_age   [H]  days between each history item and t (0 on padding)
  user_dense [3]  log1p(#all prior items), log1p(days since the first), log1p(days since the last)
                  (zeros without history)
Evaluation user (>= 1 rating before and >= 1 at/after the cut): the same features with t = cut,
from pre-cut ratings only; `seen` = the pre-cut items (excluded from the ranking), `positives` =
the items rated at/after the cut. Users with post-cut ratings but no history are cold-start users:
counted, not evaluated.

  item_dense [2]  the target's popularity AT t: log1p(ratings in the `popularity_window_days`
                  before t), log1p(all ratings before t)
Item catalogue (every movie of movies.csv; catalogue index = row + 1, 0 = padding): hashed id,
genre ids, release-year bucket (decades 1920s..2010s, before 1920 in the first, 0 = unknown),
title word tokens (vocabulary of the catalogue titles: metadata, no interactions), and the same
dense popularity at the cut. Production recomputes item embeddings daily with fresh "recent
performance" features (SPEC §3); training reads each item's popularity as of its example's time
and evaluation/serving the popularity as of the cut, so the feature means the same thing in both,
and nothing after the cut leaks into training or into evaluation features.

Prepared layout (<workdir>/prepared):
  meta.json                        cut, counts, dims, genre names, bad rows
  items.parquet                    the catalogue (also what `launch.py embed` reads)
  title_vocab.txt                  title words, id = line number + 1
  train/shard-NNNNN.parquet        training examples (user, item, timestamp, features)
  eval/users.parquet               evaluation users (features, seen, positives)

Usage:
  summary = prepare_movielens(movielens.load(path), config.data, "runs/twotower/prepared")
  examples, catalogue = load_examples(prepared), Catalogue.load(prepared)
"""

import collections
import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data import text
from omnisage.data.sources import movielens

DAY_S = 86400.0
USER_DENSE_DIM = 3
ITEM_DENSE_DIM = 2
NUM_YEAR_BUCKETS = 12   # 0 unknown, 1 before 1930, 2..10 the 1930s..2010s, 11 2020 onwards
META, ITEMS, TITLE_VOCAB = "meta.json", "items.parquet", "title_vocab.txt"
EXAMPLE_COLUMNS = ("user", "item", "timestamp", "hist_items", "hist_age", "user_dense",
                   "item_dense")


def year_bucket(year) -> int:
  if year is None:
    return 0
  return int(np.clip((year - 1920) // 10, 0, NUM_YEAR_BUCKETS - 2)) + 1


def user_features(prior_items: np.ndarray, prior_ts: np.ndarray, now: float, history_len: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(hist_items [H] int32, hist_age [H] float32 days, user_dense [3] float32) of one user at
  `now`, from ALL their items strictly before now (`prior_*`, ascending time). Serving calls this
  too, so the online features are computed exactly as the training features."""
  n = len(prior_items)
  items = np.zeros(history_len, np.int32)
  ages = np.zeros(history_len, np.float32)
  dense = np.zeros(USER_DENSE_DIM, np.float32)
  if n:
    take = min(n, history_len)
    items[:take] = prior_items[::-1][:take]
    ages[:take] = (now - np.asarray(prior_ts[::-1][:take], np.float64)) / DAY_S
    dense[:] = (np.log1p(n), np.log1p((now - prior_ts[0]) / DAY_S),
                np.log1p((now - prior_ts[-1]) / DAY_S))
  return items, ages, dense


def _title_vocab(titles: list[str], size: int) -> list[str]:
  counts = collections.Counter(w for t in titles for w in text.words(text.normalize(t)))
  return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def build_catalogue(movies: pa.Table, ratings: pa.Table, cut: int, data_config) -> tuple:
  """(items table, genre names, title vocab) of every movie; popularity from pre-cut ratings."""
  movie_ids = movies["movie"].to_numpy()
  index_of = {int(m): i + 1 for i, m in enumerate(movie_ids)}
  genres = sorted({g for gs in movies["genres"].to_pylist() for g in gs})
  genre_id = {g: i for i, g in enumerate(genres)}
  titles = movies["title"].to_pylist()
  vocab = _title_vocab(titles, int(data_config.title_vocab))
  word_id = {w: i + 1 for i, w in enumerate(vocab)}
  max_tokens = int(data_config.title_tokens)
  title_tokens = [[word_id[w] for w in text.words(text.normalize(t)) if w in word_id][:max_tokens]
                  for t in titles]

  ts = ratings["timestamp"].to_numpy()
  rated = np.array([index_of[int(m)] for m in ratings["movie"].to_numpy()], np.int64)
  before = ts < cut
  recent = before & (ts >= cut - data_config.popularity_window_days * DAY_S)
  n = len(movie_ids) + 1
  total = np.bincount(rated[before], minlength=n)
  window = np.bincount(rated[recent], minlength=n)
  dense = np.stack([np.log1p(window), np.log1p(total)], axis=1).astype(np.float32)[1:]

  items = pa.table({
      "entity_index": pa.array(np.arange(1, n, dtype=np.int32)),
      "id": pa.array([str(int(m)) for m in movie_ids], pa.string()),
      "title": movies["title"],
      "genre_ids": pa.array([[genre_id[g] for g in gs] for gs in movies["genres"].to_pylist()],
                            pa.list_(pa.int32())),
      "year_bucket": pa.array([year_bucket(y) for y in movies["year"].to_pylist()], pa.int32()),
      "title_tokens": pa.array(title_tokens, pa.list_(pa.int32())),
      "dense": pa.array(list(dense), pa.list_(pa.float32(), ITEM_DENSE_DIM)),
      "count_window": pa.array(window[1:].astype(np.int64)),
      "count_total": pa.array(total[1:].astype(np.int64)),
  })
  return items, genres, vocab, index_of


def _fixed(x: np.ndarray, dtype) -> pa.Array:
  return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1), dtype),
                                           x.shape[1])


def popularity_at(items: np.ndarray, ts: np.ndarray, query_items: np.ndarray,
                  query_ts: np.ndarray, window_days: float) -> np.ndarray:
  """[n, 2] float32 log1p(ratings of each query item in [t - window, t)), log1p(ratings < t),
  counting the rated (items, ts)."""
  shift = np.int64(1) << 40   # item * 2^40 + timestamp: sorts by item, then by time
  keys = np.sort(items.astype(np.int64) * shift + ts)
  q_item = query_items.astype(np.int64) * shift
  start = np.searchsorted(keys, q_item, side="left")   # the item's first rating
  before = np.searchsorted(keys, q_item + query_ts, side="left")
  window = np.searchsorted(keys, q_item + query_ts - int(window_days * DAY_S), side="left")
  return np.stack([np.log1p(before - np.maximum(window, start)),
                   np.log1p(before - start)], axis=1).astype(np.float32)


def build_examples(ratings: pa.Table, index_of: dict, cut: int, history_len: int,
                   window_days: float):
  """(train example columns, eval user columns, cold-start user count)."""
  users = ratings["user"].to_numpy()
  items = np.array([index_of[int(m)] for m in ratings["movie"].to_numpy()], np.int32)
  ts = ratings["timestamp"].to_numpy()
  pre = ts < cut
  pop = popularity_at(items[pre], ts[pre], items, ts, window_days)
  # Time order within each user; movie index breaks ties so the output never depends on file order.
  order = np.lexsort((items, ts, users))
  users, items, ts, pop = users[order], items[order], ts[order], pop[order]
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  ends = np.r_[starts[1:], len(users)]
  train = {k: [] for k in EXAMPLE_COLUMNS}
  evals = {k: [] for k in ("user", "hist_items", "hist_age", "user_dense", "seen", "positives")}
  cold = 0
  for s, e in zip(starts, ends):
    u_items, u_ts = items[s:e], ts[s:e]
    n_before = int(np.searchsorted(u_ts, cut, side="left"))
    # Prior items of the k-th rating: every rating strictly earlier in time.
    first_at = np.searchsorted(u_ts, u_ts[:n_before], side="left")
    for k in range(n_before):
      p = first_at[k]
      h, a, d = user_features(u_items[:p], u_ts[:p], float(u_ts[k]), history_len)
      values = (users[s], u_items[k], u_ts[k], h, a, d, pop[s + k])
      for key, value in zip(EXAMPLE_COLUMNS, values):
        train[key].append(value)
    if n_before < e - s:
      if n_before == 0:
        cold += 1
        continue
      h, a, d = user_features(u_items[:n_before], u_ts[:n_before], float(cut), history_len)
      for key, value in zip(("user", "hist_items", "hist_age", "user_dense"), (users[s], h, a, d)):
        evals[key].append(value)
      evals["seen"].append(np.unique(u_items[:n_before]).tolist())
      evals["positives"].append(np.unique(u_items[n_before:]).tolist())
  return train, evals, cold


def _table(columns: dict) -> pa.Table:
  out = {}
  for key, values in columns.items():
    if key in ("seen", "positives"):
      out[key] = pa.array(values, pa.list_(pa.int32()))
    elif key in ("hist_items",):
      out[key] = _fixed(np.stack(values).astype(np.int32), pa.int32())
    elif key in ("hist_age", "user_dense", "item_dense"):
      out[key] = _fixed(np.stack(values).astype(np.float32), pa.float32())
    else:
      out[key] = pa.array(np.asarray(values, np.int64 if key == "timestamp" else np.int32))
  return pa.table(out)


def _per_user(ml: movielens.MovieLens, data_config) -> tuple:
  """The catalogue, examples and evaluation users of the per-user protocol's stage
  (user_protocol.py): everything from the stage's histories only."""
  from omnisage.data.twotower import user_protocol
  r = ml.ratings
  split = user_protocol.stage_split(
      r["user"].to_numpy(), r["movie"].to_numpy(), r["timestamp"].to_numpy(),
      str(data_config.stage), float(data_config.test_fraction))
  history = user_protocol.history_ratings(split)
  # "Now" of the popularity features: just after the last training interaction.
  cut = int(history["timestamp"].to_numpy().max()) + 1
  items, genres, vocab, index_of = build_catalogue(ml.movies, history, cut, data_config)
  dense = np.concatenate([np.zeros((1, ITEM_DENSE_DIM), np.float32),
                          np.stack(items["dense"].to_numpy(zero_copy_only=False))])
  train, evals = user_protocol.build_user_examples(
      split, index_of, int(data_config.history_len), int(data_config.future_window),
      seed=int(data_config.get("example_seed", 0)), item_dense=dense)
  extra = {"stage": str(data_config.stage), "test_fraction": float(data_config.test_fraction),
           "future_window": int(data_config.future_window),
           "skipped_users": split.skipped}
  return cut, items, genres, vocab, train, evals, 0, extra


def prepare_movielens(ml: movielens.MovieLens, data_config, out_dir: str) -> dict:
  """Writes the prepared layout (module docstring) to out_dir; returns a JSON-ready summary.
  `data.split`: "global" (one time cut) or "per_user" (user_protocol.py, `data.stage`)."""
  history_len = int(data_config.history_len)
  split = data_config.get("split", "global")
  if split == "per_user":
    cut, items, genres, vocab, train, evals, cold, extra = _per_user(ml, data_config)
  elif split == "global":
    cut = movielens.time_split(ml.ratings, float(data_config.split_quantile))
    items, genres, vocab, index_of = build_catalogue(ml.movies, ml.ratings, cut, data_config)
    train, evals, cold = build_examples(ml.ratings, index_of, cut, history_len,
                                        float(data_config.popularity_window_days))
    extra = {}
  else:
    raise ValueError(f"config field data.split={split!r}: one of 'global', 'per_user'")
  if not train["user"] or not evals["user"]:
    raise ValueError(f"{ml.path}: the time split at {cut} leaves {len(train['user'])} training "
                     f"examples and {len(evals['user'])} evaluation users; both must be > 0")
  os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
  for old in glob.glob(os.path.join(out_dir, "train", "shard-*.parquet")):
    os.remove(old)   # a previous prepare with more shards must not leave extra ones behind
  pq.write_table(items, os.path.join(out_dir, ITEMS))
  with open(os.path.join(out_dir, TITLE_VOCAB), "w", encoding="utf-8") as f:
    f.writelines(w + "\n" for w in vocab)
  table = _table(train)
  shards = int(data_config.num_shards)
  bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
  for i in range(shards):
    pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]),
                   os.path.join(out_dir, "train", f"shard-{i:05d}.parquet"))
  pq.write_table(_table(evals), os.path.join(out_dir, "eval", "users.parquet"))
  ts = ml.ratings["timestamp"].to_numpy()
  meta = {
      "dataset": ml.path, "engagement": "every rating", "split": split, **extra, "cut": cut,
      "split_quantile": float(data_config.split_quantile),
      "ratings_before_cut": int((ts < cut).sum()), "ratings_after_cut": int((ts >= cut).sum()),
      "train_examples": table.num_rows, "eval_users": len(evals["user"]),
      "eval_positives": int(sum(len(p) for p in evals["positives"])),
      "cold_start_eval_users_skipped": cold,
      "num_items": items.num_rows, "genres": genres, "title_vocab": len(vocab),
      "history_len": history_len, "title_tokens": int(data_config.title_tokens),
      "user_dense_dim": USER_DENSE_DIM, "item_dense_dim": ITEM_DENSE_DIM,
      "num_year_buckets": NUM_YEAR_BUCKETS,
      "popularity_window_days": float(data_config.popularity_window_days),
      "bad_rows": ml.bad.report(),
  }
  with open(os.path.join(out_dir, META), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def read_meta(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` first")
  with open(path) as f:
    return json.load(f)


def _fixed_column(table: pa.Table, name: str, dtype) -> np.ndarray:
  column = table.column(name).combine_chunks()
  return column.flatten().to_numpy().astype(dtype).reshape(len(table), column.type.list_size)


def load_examples(prepared_dir: str) -> dict[str, np.ndarray]:
  """All training examples as column arrays (80k rows for ml-latest-small: tens of MB)."""
  paths = sorted(glob.glob(os.path.join(prepared_dir, "train", "shard-*.parquet")))
  if not paths:
    raise FileNotFoundError(f"no training shards under {prepared_dir}/train: run prepare")
  table = pa.concat_tables([pq.read_table(p) for p in paths])
  return {"user": table["user"].to_numpy().astype(np.int32),
          "item": table["item"].to_numpy().astype(np.int32),
          "timestamp": table["timestamp"].to_numpy(),
          "hist_items": _fixed_column(table, "hist_items", np.int32),
          "hist_age": _fixed_column(table, "hist_age", np.float32),
          "user_dense": _fixed_column(table, "user_dense", np.float32),
          "item_dense": _fixed_column(table, "item_dense", np.float32)}


def load_eval_users(prepared_dir: str) -> dict:
  table = pq.read_table(os.path.join(prepared_dir, "eval", "users.parquet"))
  return {"user": table["user"].to_numpy(),
          "hist_items": _fixed_column(table, "hist_items", np.int32),
          "hist_age": _fixed_column(table, "hist_age", np.float32),
          "user_dense": _fixed_column(table, "user_dense", np.float32),
          "seen": table["seen"].to_pylist(), "positives": table["positives"].to_pylist()}


def _pad(lists: list, width: int) -> np.ndarray:
  out = np.zeros((len(lists), width), np.int32)
  for i, row in enumerate(lists):
    out[i, :min(len(row), width)] = row[:width]
  return out


class Catalogue:
  """The item features of the towers, row = catalogue index (row 0: padding, all zeros)."""

  def __init__(self, table: pa.Table, num_genres: int, title_tokens: int):
    n = table.num_rows + 1
    self.ids = [""] + table["id"].to_pylist()
    self.titles = [""] + table["title"].to_pylist()
    self.index_of = {item_id: i for i, item_id in enumerate(self.ids) if i}
    self.genres = np.zeros((n, num_genres), np.float32)
    for i, gs in enumerate(table["genre_ids"].to_pylist(), start=1):
      self.genres[i, gs] = 1.0
    self.year = np.r_[0, table["year_bucket"].to_numpy()].astype(np.int32)
    self.dense = np.concatenate([np.zeros((1, ITEM_DENSE_DIM), np.float32),
                                 _fixed_column(table, "dense", np.float32)])
    self.title = np.concatenate([np.zeros((1, title_tokens), np.int32),
                                 _pad(table["title_tokens"].to_pylist(), title_tokens)])
    self.count_window = np.r_[0, table["count_window"].to_numpy()]
    self.count_total = np.r_[0, table["count_total"].to_numpy()]
    self.size = n - 1

  @classmethod
  def load(cls, prepared_dir: str, items_path: str | None = None) -> "Catalogue":
    meta = read_meta(prepared_dir)
    return cls.from_file(items_path or os.path.join(prepared_dir, ITEMS), len(meta["genres"]),
                         meta["title_tokens"])

  @classmethod
  def from_file(cls, path: str, num_genres: int, title_tokens: int) -> "Catalogue":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: item catalogue not found (prepared items.parquet)")
    table = pq.read_table(path)
    missing = [c for c in ("entity_index", "id", "title", "genre_ids", "year_bucket", "dense",
                           "title_tokens", "count_window", "count_total")
               if c not in table.column_names]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing} (not a two-tower item catalogue)")
    if table["entity_index"].to_pylist() != list(range(1, table.num_rows + 1)):
      raise ValueError(f"{path}: entity_index must be 1..{table.num_rows} in order")
    return cls(table, num_genres, title_tokens)

  def item_inputs(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Item-tower inputs of catalogue indices `idx` [B]."""
    return {"item": idx.astype(np.int32), "item_genres": self.genres[idx],
            "item_year": self.year[idx], "item_dense": self.dense[idx],
            "item_title": self.title[idx]}

  def user_inputs(self, hist_items: np.ndarray, hist_age: np.ndarray, user_dense: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """User-tower inputs: the history's genres are gathered here, not stored per example."""
    return {"hist_items": hist_items, "hist_age": hist_age,
            "hist_genres": self.genres[hist_items], "user_dense": user_dense}
