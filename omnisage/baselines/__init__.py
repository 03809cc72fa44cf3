"""Baselines that benchmarks and evaluation compare against: BM25 (bm25.py), the off-the-shelf
MiniLM sentence encoder (text_encoder.py), popularity, item co-occurrence and item-kNN
(popularity.py), EASE (ease.py)."""
