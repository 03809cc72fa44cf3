"""MovieLens Latest Small (GroupLens, ml-latest-small): users' ratings and tags of movies over time.

The user -> item data of the home-feed two-tower model and of PinnerSage (user histories over
time); movie titles and genres are the item text. See ../shared/datasets/movielens-latest-small/
(SOURCE.md, README.txt): 100,836 ratings, 3,683 tags, 9,742 movies, 610 users, 1996-03 to 2018-09.

Files (UTF-8, comma-separated, titles and tags quoted when they hold commas):
  ratings.csv  userId,movieId,rating,timestamp  rating: half stars 0.5..5.0; timestamp: seconds UTC
  movies.csv   movieId,title,genres             title "Name (yyyy)"; genres "A|B" or
                                                "(no genres listed)"
  tags.csv     userId,movieId,tag,timestamp     tag: free text (kept stripped of outer spaces)

Bad rows are dropped and counted by reason: a wrong field count, a non-numeric id
(`invalid_id`), a rating outside 0.5..5 or off the half-star grid (`invalid_rating`), a
non-integer timestamp (`invalid_timestamp`), an empty title or tag (`empty_title`, `empty_tag`), a
movie id repeated in movies.csv (`duplicate_movie`, first kept), a rating or tag of a movie that is
not in movies.csv (`unknown_movie`) and a second rating of the same (user, movie)
(`duplicate_rating`, first kept).

Usage:
  ml = load("../shared/datasets/movielens-latest-small")
  ml.ratings   # user int32, movie int32, rating float32, timestamp int64
  ml.movies    # movie int32, title string, year int32 (null when unknown), genres list<string>
  ml.tags      # user int32, movie int32, tag string, timestamp int64
  cut = time_split(ml.ratings, 0.8)   # train: timestamp < cut; eval: timestamp >= cut
"""

import dataclasses
import datetime
import math
import os
import re

import numpy as np
import pyarrow as pa

from omnisage.data.sources.common import BadRows, read_delimited

RATINGS, MOVIES, TAGS = "ratings.csv", "movies.csv", "tags.csv"
RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
MOVIES_HEADER = ("movieId", "title", "genres")
TAGS_HEADER = ("userId", "movieId", "tag", "timestamp")
NO_GENRES = "(no genres listed)"
# "Name (1995)" -> ("Name", 1995). Titles without a year (TV series, a few recent films) and year
# ranges such as "(2006–2007)" keep their whole title and a null year.
TITLE_YEAR = re.compile(r"(.*\S)\s+\((\d{4})\)")
ID = re.compile(r"[0-9]+")          # int() alone would take "+5", " 5", "1_000" and "٣"
TIMESTAMP = re.compile(r"-?[0-9]+")
INT32_MAX = 2**31 - 1


def split_title(title: str) -> tuple[str, int | None]:
  """("Toy Story", 1995) from "Toy Story (1995)"; (title, None) when there is no trailing year."""
  title = title.strip()  # 11 titles of the real file end with a space
  m = TITLE_YEAR.fullmatch(title)
  return (m.group(1), int(m.group(2))) if m else (title, None)


def parse_genres(genres: str) -> list[str]:
  genres = genres.strip()
  if genres == NO_GENRES:
    return []
  return [g for g in genres.split("|") if g]


def _id(text: str) -> int | None:
  text = text.strip()
  return int(text) if ID.fullmatch(text) and int(text) <= INT32_MAX else None


def _timestamp(text: str) -> int | None:
  text = text.strip()
  return int(text) if TIMESTAMP.fullmatch(text) and abs(int(text)) < 2**63 else None


def _rating(text: str) -> float | None:
  try:
    r = float(text)
  except ValueError:
    return None
  # Half stars only: 0.5, 1.0, ..., 5.0 (nan and inf fail the range test).
  return r if 0.5 <= r <= 5.0 and (2 * r).is_integer() else None


def time_split(ratings, quantile: float = 0.8) -> int:
  """The global time split's cut (seconds): train = timestamp < cut, eval = timestamp >= cut.

  `ratings`: a table with a `timestamp` column (or the timestamps themselves). The cut is the
  timestamp at position floor(quantile * n) of the sorted timestamps, so at most that share of the
  rows is before it (rows tied at the cut all go to eval, never split across the two sides). One
  cut for every user, not a per-user split: the model is trained on the past and evaluated on the
  future, as it would be served. Apply the same cut to the tags.
  """
  if not 0.0 < quantile < 1.0:
    raise ValueError(f"time_split: quantile {quantile} is not in (0, 1)")
  ts = ratings["timestamp"] if hasattr(ratings, "column_names") else ratings
  ts = np.sort(np.asarray(ts, np.int64))
  if ts.size == 0:
    raise ValueError("time_split: no timestamps")
  cut = int(ts[min(int(math.floor(quantile * ts.size)), ts.size - 1)])
  if cut <= ts[0]:
    raise ValueError(f"time_split: quantile {quantile} leaves no training rows "
                     f"(the first {ts.size} timestamps start at the cut {cut})")
  return cut


def _span(ts: np.ndarray) -> list | None:
  """[first, last, first UTC, last UTC] of timestamps in seconds; None when there are none."""
  if not ts.size:
    return None
  iso = lambda t: datetime.datetime.fromtimestamp(int(t), datetime.UTC).strftime(
      "%Y-%m-%dT%H:%M:%SZ")
  return [int(ts.min()), int(ts.max()), iso(ts.min()), iso(ts.max())]


@dataclasses.dataclass
class MovieLens:
  ratings: pa.Table  # user int32, movie int32, rating float32, timestamp int64; file order
  movies: pa.Table   # movie int32, title string, year int32 (nullable), genres list<string>
  tags: pa.Table     # user int32, movie int32, tag string, timestamp int64; file order
  bad: BadRows
  path: str          # the dataset folder

  def summary(self) -> dict:
    users = set(self.ratings["user"].to_pylist()) | set(self.tags["user"].to_pylist())
    span = {k: _span(t["timestamp"].to_numpy()) for k, t in (("ratings", self.ratings),
                                                             ("tags", self.tags))}
    return {"path": self.path, "ratings": self.ratings.num_rows, "movies": self.movies.num_rows,
            "tags": self.tags.num_rows, "users": len(users),
            "rating_users": len(set(self.ratings["user"].to_pylist())),
            "rated_movies": len(set(self.ratings["movie"].to_pylist())),
            "movies_without_year": self.movies["year"].null_count,
            "time_range": {k: v and v[:2] for k, v in span.items()},
            "time_range_utc": {k: v and v[2:] for k, v in span.items()},
            "bad_rows": self.bad.report()}


def _read_movies(file: str, bad: BadRows) -> pa.Table:
  ids, titles, years, genres = [], [], [], []
  seen: set[int] = set()
  for line, row in read_delimited(file, header=MOVIES_HEADER, bad=bad):
    movie = _id(row["movieId"])
    if movie is None:
      bad.add("invalid_id", file, line, row)
      continue
    title, year = split_title(row["title"])
    if not title:
      bad.add("empty_title", file, line, row)
      continue
    if movie in seen:
      bad.add("duplicate_movie", file, line, row)
      continue
    seen.add(movie)
    ids.append(movie)
    titles.append(title)
    years.append(year)
    genres.append(parse_genres(row["genres"]))
  return pa.table({"movie": pa.array(ids, pa.int32()), "title": pa.array(titles, pa.string()),
                   "year": pa.array(years, pa.int32()),
                   "genres": pa.array(genres, pa.list_(pa.string()))})


def _read_events(file: str, header: tuple, value: str, movies: set[int], bad: BadRows):
  """(users, movies, values, timestamps) of ratings.csv or tags.csv; `value` is "rating"/"tag"."""
  users, items, values, stamps = [], [], [], []
  rated: set[tuple[int, int]] = set()
  for line, row in read_delimited(file, header=header, bad=bad):
    user, movie = _id(row["userId"]), _id(row["movieId"])
    if user is None or movie is None:
      bad.add("invalid_id", file, line, row)
      continue
    if value == "rating":
      v = _rating(row["rating"])
      if v is None:
        bad.add("invalid_rating", file, line, row)
        continue
    else:
      v = row["tag"].strip()
      if not v:
        bad.add("empty_tag", file, line, row)
        continue
    ts = _timestamp(row["timestamp"])
    if ts is None:
      bad.add("invalid_timestamp", file, line, row)
      continue
    if movie not in movies:
      bad.add("unknown_movie", file, line, row)
      continue
    if value == "rating":
      if (user, movie) in rated:
        bad.add("duplicate_rating", file, line, row)
        continue
      rated.add((user, movie))
    users.append(user)
    items.append(movie)
    values.append(v)
    stamps.append(ts)
  return users, items, values, stamps


def _find(folder: str, name: str) -> str:
  """folder/name, or folder/name.gz when only the compressed file is there."""
  plain = os.path.join(folder, name)
  return plain + ".gz" if not os.path.isfile(plain) and os.path.isfile(plain + ".gz") else plain


def load(path: str) -> MovieLens:
  """Reads the dataset folder `path`: ratings.csv, movies.csv, tags.csv (each may be .gz)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a MovieLens folder (ratings.csv, movies.csv, tags.csv)")
  file = lambda name: _find(path, name)
  bad = BadRows()
  movies = _read_movies(file(MOVIES), bad)
  if movies.num_rows == 0:
    raise ValueError(f"{file(MOVIES)}: no valid movies; bad rows: {dict(bad.counts)}")
  known = set(movies["movie"].to_pylist())
  u, m, r, t = _read_events(file(RATINGS), RATINGS_HEADER, "rating", known, bad)
  if not u:
    raise ValueError(f"{file(RATINGS)}: no valid ratings; bad rows: {dict(bad.counts)}")
  ratings = pa.table({"user": pa.array(np.asarray(u, np.int32)),
                      "movie": pa.array(np.asarray(m, np.int32)),
                      "rating": pa.array(np.asarray(r, np.float32)),
                      "timestamp": pa.array(np.asarray(t, np.int64))})
  u, m, g, t = _read_events(file(TAGS), TAGS_HEADER, "tag", known, bad)
  tags = pa.table({"user": pa.array(np.asarray(u, np.int32)),
                   "movie": pa.array(np.asarray(m, np.int32)),
                   "tag": pa.array(g, pa.string()),
                   "timestamp": pa.array(np.asarray(t, np.int64))})
  return MovieLens(ratings, movies, tags, bad, path)
