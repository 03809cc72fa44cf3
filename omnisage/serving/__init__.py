"""omnisage.serving: export, batch embedding, ScaNN indexes and the query service (later issues)."""
