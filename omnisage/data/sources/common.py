"""Shared pieces of the dataset loaders: bad-row accounting and line-numbered CSV reading.

Usage:
  bad = BadRows()
  for line, row in read_delimited(path, encoding="latin-1", header=("id", "title")):
    if not row["title"]:
      bad.add("empty_title", path, line, row)
  bad.counts   # {"empty_title": 3}
"""

import collections
import csv
import gzip
import io
import os
import re
from collections.abc import Iterator, Sequence

EXAMPLES = 5  # bad rows quoted per reason
UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of an undecodable byte


class BadRows:
  """Counts of dropped rows by reason, with the first few quoted as 'file:line: reason: row'."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, reason: str, path: str, line: int, row=None) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < EXAMPLES:
      shown = "" if row is None else f": {str(row)[:200]}"
      self.examples[reason].append(f"{os.path.basename(path)}:{line}: {reason}{shown}")

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def report(self) -> dict:
    """JSON-ready {"total", "by_reason", "examples"}."""
    return {"total": self.total, "by_reason": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()}}


def open_text(path: str, encoding: str) -> io.TextIOBase:
  """A text stream of a plain or .gz file; newline='' as the csv module wants."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
  # surrogateescape: a byte that is not `encoding` becomes one lone surrogate in its own row,
  # instead of a UnicodeDecodeError that costs the whole 8 KiB decode chunk (read_delimited then
  # counts that row as "unreadable_line").
  return io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")


def read_delimited(path: str, *, encoding: str = "utf-8", header: Sequence[str] | None = None,
                   delimiter: str = ",", has_header: bool = True, bad: BadRows | None = None
                   ) -> Iterator[tuple[int, dict]]:
  """(line number, {column: text}) per data row of a CSV/TSV file.

  `header`: the expected column names; a file whose header differs is refused (a wrong file is a
  user mistake, not a bad row). Rows with the wrong number of fields go to `bad` as
  "wrong_field_count". Line numbers are 1-based physical lines of the file (header = line 1).
  """
  with open_text(path, encoding) as f:
    reader = csv.reader(f, delimiter=delimiter)
    names = list(header) if header is not None else None
    if has_header:
      try:
        found = next(reader)
      except StopIteration:
        raise ValueError(f"{path}: empty file, expected a header {list(header or [])}") from None
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line 1 is not {encoding} text ({e.reason})") from None
      if any(UNDECODABLE.search(c) for c in found):
        raise ValueError(f"{path}: line 1 is not {encoding} text")
      found = [c.strip().lstrip("\ufeff") for c in found]
      if names is not None and found != names:
        raise ValueError(f"{path}: header {found} is not the expected {names}")
      names = found
    elif names is None:
      raise ValueError("read_delimited needs `header` when the file has none")
    line = reader.line_num
    while True:
      try:
        fields = next(reader)
      except StopIteration:
        return
      except (csv.Error, UnicodeDecodeError) as e:
        if bad is None:
          raise ValueError(f"{path}:{reader.line_num}: {e}") from None
        bad.add("unreadable_line", path, reader.line_num)
        line = reader.line_num
        continue
      start, line = line + 1, reader.line_num
      if not fields:  # blank line
        continue
      if any(UNDECODABLE.search(f) for f in fields):
        if bad is None:
          raise ValueError(f"{path}:{start}: not {encoding} text")
        bad.add("unreadable_line", path, start)
        continue
      if len(fields) != len(names):
        if bad is None:
          raise ValueError(f"{path}:{start}: {len(fields)} fields, expected {len(names)}")
        bad.add("wrong_field_count", path, start, fields)
        continue
      yield start, dict(zip(names, fields))
