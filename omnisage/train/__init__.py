"""omnisage.train."""
