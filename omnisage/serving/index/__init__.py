"""Batch embedding (embed.py), exact and ScaNN search (ann.py), per-kind auto-tuned indexes
(scann_index.py)."""
