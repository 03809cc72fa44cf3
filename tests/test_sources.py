"""Dataset loaders (omnisage.data.sources): every bad-row reason on small hand-made slices (always
run, no datasets needed), and the exact counts of SOURCE.md / the datasets README on the real files
(skipped when $OMNISAGE_DATASETS, default ../shared/datasets, lacks the dataset)."""

import gzip
import os
import zlib

import numpy as np
import pyarrow as pa
import pytest

from omnisage.data.sources import homedepot, movielens, wands
from tests.helpers import ROOT

DATASETS = os.path.join(ROOT, os.environ.get("OMNISAGE_DATASETS",
                                             os.path.join("..", "shared", "datasets")))


def dataset(name: str) -> str:
  path = os.path.join(DATASETS, name)
  if not os.path.isdir(path):
    pytest.skip(f"{path} is absent (set OMNISAGE_DATASETS to the datasets folder)")
  return path


def write(path, data: bytes) -> str:
  """Writes bytes to `path` (gzipped when it ends in .gz); returns it as a str."""
  path = str(path)
  with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
    f.write(data)
  return path


def examples(bad) -> list[str]:
  return [e for v in bad.report()["examples"].values() for e in v]


# ---------------------------------------------------------------------------------------------
# Home Depot (latin-1 CSV, gzipped)

HD_HEADER = b'"id","product_uid","product_title","search_term","relevance"\n'
HD_SLICE = HD_HEADER + b"".join([
    b'2,100001,"Simpson Strong-Tie 12-Gauge Angle","angle bracket",3\n',   # 2 good
    b'3,100001,"Simpson Strong-Tie 12-Gauge Angle","l bracket",2.33\n',    # 3 good, not positive
    # 4 good: a latin-1 byte (0xe9 = e acute) and the UTF-8 pair C3 A9, which latin-1 reads as two
    # characters; the Kaggle file holds such mojibake and the protocol keeps it as is.
    b'4,100002,"Caf\xc3\xa9 Table, 30 in.","caf\xe9 table",2.67\n',
    b'5,100001,"Simpson Angle (new)","angle",1\n',                          # 5 conflicting_title
    b'6,100003,"Nails","nails"\n',                                          # 6 wrong_field_count
    b'7,,"No uid","x",3\n',                                                 # 7 missing_field
    b'8,100004,"T","x",\n',                                                 # 8 missing_field
    b'9,100004,"T","x",abc\n',                                              # 9 invalid_relevance
    b'10,100004,"T","x",3.5\n',                                             # 10 invalid_relevance
    b'11,100004,"T","   ",2\n',                                             # 11 empty_query
    b'12,100005,"Two-line\ntitle","hinge",2\n',                             # 12-13 good
])


def test_homedepot_slice(tmp_path):
  folder = tmp_path / "hd"
  folder.mkdir()
  write(folder / "train.csv.gz", HD_SLICE)
  hd = homedepot.load(str(folder))
  assert hd.path.endswith("train.csv.gz")
  assert dict(hd.bad.counts) == {"conflicting_title": 1, "wrong_field_count": 1,
                                 "missing_field": 2, "invalid_relevance": 2, "empty_query": 1}
  # Every dropped or flagged row is quoted as "file:line: reason: row".
  assert {":".join(e.split(":")[:3]) for e in examples(hd.bad)} == {
      f"train.csv.gz:{n}: {r}" for n, r in [
          (5, "conflicting_title"), (6, "wrong_field_count"), (7, "missing_field"),
          (8, "missing_field"), (9, "invalid_relevance"), (10, "invalid_relevance"),
          (11, "empty_query")]}
  j = hd.judgements
  assert j.schema == pa.schema([("line", pa.int64()), ("query", pa.string()),
                                ("product_id", pa.string()), ("relevance", pa.float64())])
  assert j.to_pylist() == [
      {"line": 2, "query": "angle bracket", "product_id": "100001", "relevance": 3.0},
      {"line": 3, "query": "l bracket", "product_id": "100001", "relevance": 2.33},
      {"line": 4, "query": "caf\u00e9 table", "product_id": "100002", "relevance": 2.67},
      {"line": 5, "query": "angle", "product_id": "100001", "relevance": 1.0},  # kept
      {"line": 12, "query": "hinge", "product_id": "100005", "relevance": 2.0}]
  # The corpus: first title per product; 100003/100004 only occur in dropped rows.
  assert hd.products.to_pylist() == [
      {"product_id": "100001", "title": "Simpson Strong-Tie 12-Gauge Angle"},
      {"product_id": "100002", "title": "Caf\u00c3\u00a9 Table, 30 in."},
      {"product_id": "100005", "title": "Two-line\ntitle"}]
  # Positives: relevance >= 2.67 (2.33 and 1 are not); split by crc32 of the latin-1 bytes.
  everything = {**hd.positives(test=True), **hd.positives(test=False)}
  assert everything == {"angle bracket": {"100001"}, "caf\u00e9 table": {"100002"}}
  assert homedepot.is_test_query("caf\u00e9 table") == (zlib.crc32(b"caf\xe9 table") % 5 == 0)
  for q in everything:
    assert (q in hd.test_positives()) == (zlib.crc32(q.encode("latin-1")) % 5 == 0)
  s = hd.summary()
  assert (s["judgements"], s["products"], s["queries"]) == (5, 3, 5)
  assert s["bad_rows"]["total"] == 7


def test_homedepot_plain_file_and_refusals(tmp_path):
  plain = write(tmp_path / "train.csv", HD_SLICE)
  assert homedepot.load(plain).judgements.num_rows == 5  # a file path, not gzipped, also works
  wrong = write(tmp_path / "wrong.csv", b'"id","uid","title","term","relevance"\n2,1,"t","q",3\n')
  with pytest.raises(ValueError, match="wrong.csv: header"):
    homedepot.load(wrong)
  only_bad = write(tmp_path / "bad.csv.gz", HD_HEADER + b'2,1,"t","q",9\n')
  with pytest.raises(ValueError, match="bad.csv.gz: no valid rows"):
    homedepot.load(only_bad)
  with pytest.raises(FileNotFoundError, match="missing"):
    homedepot.load(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# MovieLens (UTF-8 CSVs with quoted fields)

ML_MOVIES = "\n".join([
    "movieId,title,genres",
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",  # 2
    '2,"American President, The (1995)",Comedy|Drama|Romance',       # 3 quoted comma
    "3,Babylon 5,Sci-Fi",                                            # 4 no year
    '4,"Death Note: Desu n\u00f4to (2006\u20132007)",(no genres listed)',  # 5 a range: no year
    "5,From Dusk Till Dawn 2: Texas Blood Money (1999) ,Comedy|Horror",  # 6 trailing space
    "x7,Bad Id (2000),Drama",                                        # 7 invalid_id
    "1,Toy Story again (1995),Comedy",                               # 8 duplicate_movie
    "8,,Drama",                                                      # 9 empty_title
    "9,Too,Many,Fields",                                             # 10 wrong_field_count
]) + "\n"
ML_RATINGS = "\n".join([
    "userId,movieId,rating,timestamp",
    "1,1,4.0,964982703",      # 2 good
    "1,2,0.5,964981247",      # 3 good
    "1,3,5,964982224",        # 4 good ("5" is a rating too)
    "2,1,3.5,1445714994",     # 5 good
    "1,1,2.0,964982999",      # 6 duplicate_rating
    "u3,1,4.0,1",             # 7 invalid_id
    "3,1,5.5,1",              # 8 invalid_rating (above 5)
    "3,1,0.0,1",              # 9 invalid_rating (below 0.5)
    "3,1,3.3,1",              # 10 invalid_rating (not a half star)
    "3,1,nan,1",              # 11 invalid_rating
    "3,1,4.0,12.5",           # 12 invalid_timestamp
    "3,999,4.0,1",            # 13 unknown_movie
    "3,8,4.0,1",              # 14 unknown_movie (movie 8's row was dropped)
    "3,1,4.0",                # 15 wrong_field_count
]) + "\n"
ML_TAGS = "\n".join([
    "userId,movieId,tag,timestamp",
    "2,1,funny,1445714994",                # 2 good
    '2,2,"dark hero, funny",1445714996',   # 3 good, quoted comma
    "3,1,   ,1445714996",                  # 4 empty_tag
    "3,999,funny,1",                       # 5 unknown_movie
    "3,abc,funny,1",                       # 6 invalid_id
    "2,1,funny,",                          # 7 invalid_timestamp
]) + "\n"


def ml_folder(tmp_path, movies=ML_MOVIES, ratings_name="ratings.csv.gz") -> str:
  folder = tmp_path / "ml"
  folder.mkdir()
  write(folder / "movies.csv", movies.encode())
  write(folder / ratings_name, ML_RATINGS.encode())  # gzipped: load finds name.csv.gz too
  write(folder / "tags.csv", ML_TAGS.encode())
  return str(folder)


def test_movielens_slice(tmp_path):
  ml = movielens.load(ml_folder(tmp_path))
  assert dict(ml.bad.counts) == {
      "invalid_id": 3, "duplicate_movie": 1, "empty_title": 1, "wrong_field_count": 2,
      "duplicate_rating": 1, "invalid_rating": 4, "invalid_timestamp": 2, "unknown_movie": 3,
      "empty_tag": 1}
  shown = {":".join(e.split(":")[:3]) for e in examples(ml.bad)}
  assert {"movies.csv:7: invalid_id", "movies.csv:8: duplicate_movie", "movies.csv:9: empty_title",
          "movies.csv:10: wrong_field_count", "ratings.csv.gz:6: duplicate_rating",
          "ratings.csv.gz:10: invalid_rating", "ratings.csv.gz:12: invalid_timestamp",
          "ratings.csv.gz:14: unknown_movie", "ratings.csv.gz:15: wrong_field_count",
          "tags.csv:4: empty_tag", "tags.csv:5: unknown_movie", "tags.csv:6: invalid_id",
          "tags.csv:7: invalid_timestamp"} <= shown
  assert ml.movies.schema == pa.schema([("movie", pa.int32()), ("title", pa.string()),
                                        ("year", pa.int32()),
                                        ("genres", pa.list_(pa.string()))])
  assert ml.movies.to_pylist() == [
      {"movie": 1, "title": "Toy Story", "year": 1995,
       "genres": ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]},
      {"movie": 2, "title": "American President, The", "year": 1995,
       "genres": ["Comedy", "Drama", "Romance"]},
      {"movie": 3, "title": "Babylon 5", "year": None, "genres": ["Sci-Fi"]},
      {"movie": 4, "title": "Death Note: Desu n\u00f4to (2006\u20132007)", "year": None,
       "genres": []},
      {"movie": 5, "title": "From Dusk Till Dawn 2: Texas Blood Money", "year": 1999,
       "genres": ["Comedy", "Horror"]}]
  assert ml.ratings.schema == pa.schema([("user", pa.int32()), ("movie", pa.int32()),
                                         ("rating", pa.float32()), ("timestamp", pa.int64())])
  assert ml.ratings.to_pylist() == [
      {"user": 1, "movie": 1, "rating": 4.0, "timestamp": 964982703},  # the first of (1, 1)
      {"user": 1, "movie": 2, "rating": 0.5, "timestamp": 964981247},
      {"user": 1, "movie": 3, "rating": 5.0, "timestamp": 964982224},
      {"user": 2, "movie": 1, "rating": 3.5, "timestamp": 1445714994}]
  assert ml.tags.schema == pa.schema([("user", pa.int32()), ("movie", pa.int32()),
                                      ("tag", pa.string()), ("timestamp", pa.int64())])
  assert ml.tags.to_pylist() == [
      {"user": 2, "movie": 1, "tag": "funny", "timestamp": 1445714994},
      {"user": 2, "movie": 2, "tag": "dark hero, funny", "timestamp": 1445714996}]
  s = ml.summary()
  assert (s["ratings"], s["movies"], s["tags"], s["users"], s["rated_movies"]) == (4, 5, 2, 2, 3)
  assert s["movies_without_year"] == 2
  assert s["time_range"]["ratings"] == [964981247, 1445714994]
  assert s["time_range_utc"]["tags"] == ["2015-10-24T19:29:54Z", "2015-10-24T19:29:56Z"]
  assert s["bad_rows"]["total"] == 18


def test_movielens_refusals(tmp_path):
  with pytest.raises(ValueError, match=r"movies.csv: header .*'movie_id'"):
    movielens.load(ml_folder(tmp_path, movies=ML_MOVIES.replace("movieId", "movie_id", 1)))
  write(tmp_path / "ml" / "movies.csv", ML_MOVIES.encode())
  (tmp_path / "ml" / "tags.csv").unlink()
  with pytest.raises(FileNotFoundError, match="tags.csv"):
    movielens.load(str(tmp_path / "ml"))
  with pytest.raises(FileNotFoundError, match="not a MovieLens folder"):
    movielens.load(str(tmp_path / "nowhere"))


def test_title_and_genres_parsing():
  assert movielens.split_title("Toy Story (1995)") == ("Toy Story", 1995)
  assert movielens.split_title("Babylon 5") == ("Babylon 5", None)
  assert movielens.split_title("1984 (1984)") == ("1984", 1984)
  assert movielens.split_title("(1995)") == ("(1995)", None)  # nothing left for a title
  assert movielens.split_title("Big (1988) (Director's cut)") == (
      "Big (1988) (Director's cut)", None)
  assert movielens.parse_genres("(no genres listed)") == []
  assert movielens.parse_genres("Comedy|Drama") == ["Comedy", "Drama"]


def test_time_split():
  ts = np.arange(1, 11, dtype=np.int64)[::-1]  # order does not matter
  assert movielens.time_split(pa.table({"timestamp": ts}), 0.8) == 9  # train 1..8, eval 9, 10
  ties = np.array([1, 2, 2, 2, 3])
  cut = movielens.time_split(ties, 0.5)
  assert cut == 2 and (ties < cut).sum() == 1  # a second is never split across train and eval
  rng = np.random.default_rng(0)
  for q in (0.1, 0.5, 0.8, 0.95):
    ts = rng.integers(0, 50, 1000)
    cut = movielens.time_split(ts, q)
    assert (ts < cut).mean() <= q < (ts <= cut).mean()  # the reference definition
  for q in (0.0, 1.0):
    with pytest.raises(ValueError, match="quantile"):
      movielens.time_split(ts, q)
  with pytest.raises(ValueError, match="no training rows"):
    movielens.time_split(np.full(10, 7), 0.8)


# Fails today: common.open_text decodes strictly in 8 KiB chunks, so one byte that is not UTF-8
# drops the ~500 rows of its chunk and the line reported is wrong. Decoding with
# errors="surrogateescape" and counting rows that hold a lone surrogate fixes it; then drop the
# mark.
def test_movielens_invalid_utf8_costs_one_row(tmp_path):
  folder = ml_folder(tmp_path)
  rows = lambda users: "".join(f"{u},1,4.0,{1000 + u}\n" for u in users).encode()
  write(os.path.join(folder, "ratings.csv.gz"), ML_RATINGS.splitlines(keepends=True)[0].encode()
        + rows(range(10, 3010)) + b"5,1,4.0,caf\xe9\n" + rows(range(3010, 6010)))
  ml = movielens.load(folder)
  assert ml.bad.counts["unreadable_line"] == 1
  assert ml.bad.examples["unreadable_line"] == ["ratings.csv.gz:3002: unreadable_line"]
  assert ml.ratings.num_rows == 6000


# ---------------------------------------------------------------------------------------------
# WANDS (TAB-separated UTF-8, CSV quoting)

WANDS_SLICE = "\n".join([
    "query_id\tquery\tquery_class",
    "0\tsalon chair\tMassage Chairs",            # 2 good
    "2\tdinosaur\tKids Wall D\u00e9cor",         # 3 good
    '3\t"fawkes 36"" blue vanity"\tVanities',    # 4 good, CSV-quoted double quote
    "5\tx\t",                                    # 5 missing_field (empty class)
    "6\t \tBeds",                                # 6 missing_field (empty query)
    "abc\tq\tBeds",                              # 7 invalid_id
    "0\tdup\tBeds",                              # 8 duplicate_query_id
    "7\tonly two",                               # 9 wrong_field_count
]) + "\n"


@pytest.mark.parametrize("name", ["query.csv", "query.csv.gz"])
def test_wands_slice(tmp_path, name):
  path = write(tmp_path / name, WANDS_SLICE.encode())
  w = wands.load(path if name.endswith(".gz") else str(tmp_path))  # a file, or the folder
  assert w.path == path
  assert dict(w.bad.counts) == {"missing_field": 2, "invalid_id": 1, "duplicate_query_id": 1,
                                "wrong_field_count": 1}
  assert {":".join(e.split(":")[:3]) for e in examples(w.bad)} == {
      f"{name}:5: missing_field", f"{name}:6: missing_field", f"{name}:7: invalid_id",
      f"{name}:8: duplicate_query_id", f"{name}:9: wrong_field_count"}
  assert w.queries.schema == pa.schema([("query_id", pa.int32()), ("query", pa.string()),
                                        ("query_class", pa.string())])
  assert w.queries.to_pylist() == [
      {"query_id": 0, "query": "salon chair", "query_class": "Massage Chairs"},
      {"query_id": 2, "query": "dinosaur", "query_class": "Kids Wall D\u00e9cor"},
      {"query_id": 3, "query": 'fawkes 36" blue vanity', "query_class": "Vanities"}]
  s = w.summary()
  assert (s["queries"], s["classes"], s["singleton_classes"]) == (3, 3, 3)


def test_wands_refusals(tmp_path):
  comma = write(tmp_path / "query.csv", b"query_id,query,query_class\n0,chair,Chairs\n")
  with pytest.raises(ValueError, match="query.csv: header"):  # comma-separated: a wrong file
    wands.load(comma)
  with pytest.raises(ValueError, match="no valid rows"):
    wands.load(write(tmp_path / "q.csv", b"query_id\tquery\tquery_class\n0\tchair\t\n"))


# ---------------------------------------------------------------------------------------------
# The real files (counts from the datasets README and each SOURCE.md)

def test_homedepot_real():
  hd = homedepot.load(dataset("homedepot-search-relevance"))
  s = hd.summary()
  assert (s["judgements"], s["products"], s["queries"]) == (74_067, 54_667, 11_795)
  assert (s["test_queries_with_positive"], s["test_pairs"]) == (1_914, 6_803)
  # 24 judgements name a product with a second title: counted, but every row is kept.
  assert dict(hd.bad.counts) == {"conflicting_title": 24}
  rel = hd.judgements["relevance"].to_numpy()
  assert rel.min() >= 1.0 and rel.max() <= 3.0
  assert set(hd.judgements["product_id"].to_pylist()) == set(hd.products["product_id"].to_pylist())


def test_movielens_real():
  ml = movielens.load(dataset("movielens-latest-small"))
  s = ml.summary()
  assert (s["ratings"], s["movies"], s["tags"], s["users"]) == (100_836, 9_742, 3_683, 610)
  assert s["rated_movies"] == 9_724
  assert ml.bad.total == 0
  assert s["time_range_utc"]["ratings"] == ["1996-03-29T18:36:55Z", "2018-09-24T14:27:30Z"]
  # 12 titles carry no year and one a year range; 34 movies list no genre.
  assert s["movies_without_year"] == 13
  assert sum(len(g) == 0 for g in ml.movies["genres"].to_pylist()) == 34
  assert ml.movies.slice(0, 1).to_pylist() == [
      {"movie": 1, "title": "Toy Story", "year": 1995,
       "genres": ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]}]
  r = ml.ratings["rating"].to_numpy()
  assert r.dtype == np.float32 and r.min() == 0.5 and r.max() == 5.0
  assert np.all(2 * r == np.round(2 * r))
  ts = ml.ratings["timestamp"].to_numpy()
  cut = movielens.time_split(ml.ratings)
  assert cut == 1_458_635_171  # 2016-03-22: the 80% time split
  assert (ts < cut).mean() <= 0.8 < (ts <= cut).mean()


def test_wands_real():
  w = wands.load(dataset("wands"))
  # 480 rows in the file; 6 have an empty query_class (the 189th distinct value of SOURCE.md).
  assert w.queries.num_rows + w.bad.total == 480
  assert dict(w.bad.counts) == {"missing_field": 6}
  assert w.summary()["classes"] == 188
  rows = {r["query_id"]: r for r in w.queries.to_pylist()}
  assert rows[2] == {"query_id": 2, "query": "dinosaur", "query_class": "Kids Wall D\u00e9cor"}
  assert rows[208]["query"] == 'fawkes 36" blue vanity'
