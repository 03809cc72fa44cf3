"""omnisage.serving: serving bundles (export.py writes them, bundle.py loads them without model
code); batch embedding, ScaNN indexes and the query service come next (SPEC §1 "Serving")."""
