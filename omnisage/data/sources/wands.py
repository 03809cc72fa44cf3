"""WANDS (Wayfair ANnotation DataSet, ECIR 2022) queries: product-search queries with a query class.

The query -> class kNN classification data of PinText. Only `query.csv` of WANDS is available (see
../shared/datasets/wands/SOURCE.md): 480 queries, 189 distinct `query_class` values. Despite its
name the file is TAB-separated UTF-8 with header `query_id  query  query_class`; a field holding
a double quote is CSV-quoted (`"fawkes 36"" blue vanity"`), which the csv module undoes.

Bad rows are dropped and counted: a wrong field count, a non-numeric query_id (`invalid_id`), a
query_id seen before (`duplicate_query_id`, first kept), an empty query or an empty class
(`missing_field`). The real file has 6 queries with an empty class (query_id 197-224, mostly
misspelt, such as "trinaic towel rod"): they are dropped, leaving 474 queries in 188 classes
(the 189th "class" of SOURCE.md is the empty string). 98 of the 188 classes have one query only.

Usage:
  w = load("../shared/datasets/wands")
  w.queries   # query_id int32, query string, query_class string; file order
"""

import collections
import dataclasses
import os
import re

import pyarrow as pa

from omnisage.data.sources.common import BadRows, read_delimited

FILE = "query.csv"
HEADER = ("query_id", "query", "query_class")
ID = re.compile(r"[0-9]+")
INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class Wands:
  queries: pa.Table  # query_id int32, query string, query_class string
  bad: BadRows
  path: str          # the query.csv file read

  def summary(self) -> dict:
    classes = collections.Counter(self.queries["query_class"].to_pylist())
    return {"path": self.path, "queries": self.queries.num_rows, "classes": len(classes),
            "largest_classes": classes.most_common(5),
            "singleton_classes": sum(1 for n in classes.values() if n == 1),
            "bad_rows": self.bad.report()}


def load(path: str) -> Wands:
  """Reads `path` (the dataset folder, or the query.csv[.gz] file itself)."""
  file = os.path.join(path, FILE) if os.path.isdir(path) else path
  bad = BadRows()
  ids, queries, classes = [], [], []
  seen: set[int] = set()
  for line, row in read_delimited(file, header=HEADER, delimiter="\t", bad=bad):
    text = row["query_id"].strip()
    if not ID.fullmatch(text) or int(text) > INT32_MAX:
      bad.add("invalid_id", file, line, row)
      continue
    if not row["query"].strip() or not row["query_class"].strip():
      bad.add("missing_field", file, line, row)
      continue
    qid = int(text)
    if qid in seen:
      bad.add("duplicate_query_id", file, line, row)
      continue
    seen.add(qid)
    ids.append(qid)
    # Outer spaces carry no meaning in a typed query or a class name (the real file has none).
    queries.append(row["query"].strip())
    classes.append(row["query_class"].strip())
  if not ids:
    raise ValueError(f"{file}: no valid rows; bad rows: {dict(bad.counts)}")
  return Wands(pa.table({"query_id": pa.array(ids, pa.int32()),
                         "query": pa.array(queries, pa.string()),
                         "query_class": pa.array(classes, pa.string())}), bad, file)
