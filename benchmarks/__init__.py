"""Benchmarks: each prints a table and ends with one JSON line (run as `python benchmarks/<name>.py`)."""
