"""omnisage.data."""
