"""Home Depot Product Search Relevance (Kaggle 2016): search term -> product title judgements.

The benchmark protocol of ../shared/datasets/README.md, implemented exactly here so every method is
measured the same way:
  - `train.csv.gz` is read as latin-1 (the Kaggle file is cp1252/ISO-8859-1, not UTF-8);
  - a pair is positive when relevance >= 2.67 (`POSITIVE`);
  - a query is a TEST query when `zlib.crc32(search_term.encode("latin-1")) % 5 == 0`; every other
    query is training data (1,914 test queries with a positive, 6,803 test pairs);
  - the corpus is every distinct product (54,667), train and test.

Bad rows (a missing field, a relevance outside [1, 3], an empty search term) are dropped and
counted. A product_uid that appears with two different titles keeps its first title; the others
are counted as `conflicting_title` (the rows themselves are kept).

Usage:
  hd = load("../shared/datasets/homedepot-search-relevance")
  hd.judgements    # pyarrow Table: line, query, product_id, relevance
  hd.products      # pyarrow Table: product_id, title (first title of each product_uid)
  test = hd.test_positives()   # {query: set of product_id}
"""

import dataclasses
import os
import zlib

import numpy as np
import pyarrow as pa

from omnisage.data.sources.common import BadRows, read_delimited

FILE = "train.csv.gz"
HEADER = ("id", "product_uid", "product_title", "search_term", "relevance")
POSITIVE = 2.67
JUDGED_NEGATIVE = 2.0   # below: judged irrelevant, a hard negative of the query (to_raw_tables)
TEST_MODULUS = 5


def is_test_query(query: str) -> bool:
  """The protocol's test split: crc32 of the raw latin-1 search term, mod 5 == 0."""
  return zlib.crc32(query.encode("latin-1")) % TEST_MODULUS == 0


@dataclasses.dataclass
class HomeDepot:
  judgements: pa.Table   # line int64, query string, product_id string, relevance float64
  products: pa.Table     # product_id string, title string; the corpus, in first-seen order
  bad: BadRows
  path: str

  def positives(self, test: bool) -> dict[str, set[str]]:
    """{query: positive product ids} of the test (or the training) queries; queries without a
    positive are left out, as in the protocol."""
    out: dict[str, set[str]] = {}
    rel = self.judgements["relevance"].to_numpy()
    for q, p, r in zip(self.judgements["query"].to_pylist(),
                       self.judgements["product_id"].to_pylist(), rel):
      if r >= POSITIVE and is_test_query(q) == test:
        out.setdefault(q, set()).add(p)
    return out

  def judged_negatives(self, queries: set[str], below: float = JUDGED_NEGATIVE) -> dict:
    """{query: product ids judged below `below` (irrelevant)} of the given queries."""
    out: dict[str, set[str]] = {}
    rel = self.judgements["relevance"].to_numpy()
    for q, p, r in zip(self.judgements["query"].to_pylist(),
                       self.judgements["product_id"].to_pylist(), rel):
      if r < below and q in queries:
        out.setdefault(q, set()).add(p)
    return out

  def test_positives(self) -> dict[str, set[str]]:
    return self.positives(test=True)

  def summary(self) -> dict:
    test = self.test_positives()
    return {"path": self.path, "judgements": self.judgements.num_rows,
            "products": self.products.num_rows,
            "queries": len(set(self.judgements["query"].to_pylist())),
            "test_queries_with_positive": len(test),
            "test_pairs": sum(len(v) for v in test.values()),
            "bad_rows": self.bad.report()}


def load(path: str) -> HomeDepot:
  """Reads `path` (the dataset folder, or the train.csv[.gz] file itself)."""
  file = os.path.join(path, FILE) if os.path.isdir(path) else path
  bad = BadRows()
  lines, queries, products, relevance = [], [], [], []
  titles: dict[str, str] = {}
  for line, row in read_delimited(file, encoding="latin-1", header=HEADER, bad=bad):
    uid, title, query = row["product_uid"].strip(), row["product_title"], row["search_term"]
    if not uid or not row["relevance"].strip():
      bad.add("missing_field", file, line, row)
      continue
    try:
      rel = float(row["relevance"])
    except ValueError:
      bad.add("invalid_relevance", file, line, row)
      continue
    if not 1.0 <= rel <= 3.0:
      bad.add("invalid_relevance", file, line, row)
      continue
    if not query.strip():
      bad.add("empty_query", file, line, row)
      continue
    if uid not in titles:
      titles[uid] = title
    elif titles[uid] != title:
      # Counted, not dropped: the judgement is still valid, the product keeps its first title.
      bad.add("conflicting_title", file, line, row)
    lines.append(line)
    queries.append(query)
    products.append(uid)
    relevance.append(rel)
  if not lines:
    raise ValueError(f"{file}: no valid rows; bad rows: {dict(bad.counts)}")
  judgements = pa.table({"line": pa.array(np.asarray(lines, np.int64)),
                         "query": pa.array(queries, pa.string()),
                         "product_id": pa.array(products, pa.string()),
                         "relevance": pa.array(np.asarray(relevance, np.float64))})
  corpus = pa.table({"product_id": pa.array(list(titles), pa.string()),
                     "title": pa.array(list(titles.values()), pa.string())})
  return HomeDepot(judgements, corpus, bad, file)


# --- the OmniSearchSage training world of Home Depot ---------------------------------------------
VALIDATION_MODULUS = 10


def is_validation_query(query: str) -> bool:
  """About 1 in 10 TRAINING queries, held out for model selection (never a test query)."""
  crc = zlib.crc32(query.encode("latin-1"))
  return crc % TEST_MODULUS != 0 and (crc // TEST_MODULUS) % VALIDATION_MODULUS == 0


def _q2query_pairs(positives: dict[str, set[str]], sources: set[str], cap: int, rng
                   ) -> list[tuple[str, str]]:
  """(q, q') with q in `sources`, q != q', sharing a positive product; at most `cap` per product."""
  by_product: dict[str, list[str]] = {}
  for q in sorted(positives):
    for p in sorted(positives[q]):
      by_product.setdefault(p, []).append(q)
  pairs = []
  for p, qs in by_product.items():
    if len(qs) < 2:
      continue
    cand = [(a, b) for a in qs if a in sources for b in qs if b != a]
    if len(cand) > cap:
      cand = [cand[i] for i in rng.choice(len(cand), cap, replace=False)]
    pairs.extend(cand)
  return pairs


def to_raw_tables(hd: HomeDepot, out_dir: str, itemsage: np.ndarray | None = None,
                  q2query_cap: int = 20, seed: int = 0) -> dict:
  """The raw tables `prepare` reads, from the NON-test queries only (test queries never enter).

  - products: every product of the corpus (title; `itemsage` = the frozen legacy vector, the
    precomputed MiniLM title embedding standing in for ItemSage);
  - queries_log, query->product: each positive (relevance >= 2.67) judgement, as a "long_click"
    (a graded judgement is the only engagement here);
  - queries_log, query->query: queries that share a positive product (SPEC §1's query->query
    task), at most `q2query_cap` ordered pairs per product;
  - split column: validation queries (`is_validation_query`) form the "eval" split, the others
    "train"; Home Depot has no time, so timestamps are 0 and the explicit split is used;
  - judged_negatives: the products a TRAINING query was judged irrelevant to (relevance < 2),
    the hard negatives of its pairs (schema.OPTIONAL_RAW_TABLES).
  """
  from omnisage.data.sources.raw import write_raw_tables
  rng = np.random.default_rng(seed)
  positives = {q: p for q, p in hd.positives(test=False).items()}
  train_q = {q for q in positives if not is_validation_query(q)}
  val_q = set(positives) - train_q
  rows = {"query": [], "entity_kind": [], "entity_id": [], "engagement": [], "split": []}

  def add(q, kind, target, engagement):
    rows["query"].append(q)
    rows["entity_kind"].append(kind)
    rows["entity_id"].append(target)
    rows["engagement"].append(engagement)
    rows["split"].append("eval" if q in val_q else "train")

  for q in sorted(positives):
    for p in sorted(positives[q]):
      add(q, "products", p, "long_click")
  # Training q2query pairs only link training queries; validation pairs may point at any
  # non-test query (the partner's text is known at serving time, it is just another query).
  train_pos = {q: positives[q] for q in train_q}
  q2q = _q2query_pairs(train_pos, train_q, q2query_cap, rng) + _q2query_pairs(
      positives, val_q, q2query_cap, rng)
  for a, b in q2q:
    add(a, "queries", b, "click")
  rows["timestamp"] = np.zeros(len(rows["query"]), np.int64)
  ids = hd.products["product_id"].to_pylist()
  products = {"id": ids, "title": hd.products["title"].to_pylist()}
  if itemsage is not None:
    if itemsage.shape[0] != len(ids):
      raise ValueError(f"itemsage has {itemsage.shape[0]} rows for {len(ids)} products")
    products["itemsage"] = itemsage
  judged = hd.judged_negatives(train_q)
  negatives = {"query": [q for q in sorted(judged) for _ in judged[q]],
               "entity_id": [p for q in sorted(judged) for p in sorted(judged[q])]}
  negatives["entity_kind"] = ["products"] * len(negatives["query"])
  written = write_raw_tables(out_dir, products=products, queries_log=rows,
                             judged_negatives=negatives)
  return {"rows": written, "train_queries": len(train_q), "validation_queries": len(val_q),
          "q2product_pairs": sum(len(v) for v in positives.values()), "q2query_pairs": len(q2q)}
