"""Loaders of the public datasets into tables (see ../shared/datasets/README.md).

Each loader takes a path (never a hard-coded location), validates every row, and returns clean
pyarrow tables plus a `BadRows` report: bad rows are dropped, counted by reason and the first few
are quoted with their file and line, so nothing is lost silently.
"""
