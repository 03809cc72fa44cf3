"""Benchmarks: each prints a table and ends with one JSON line.

Run as `python benchmarks/<name>.py` from the repo root.
"""
