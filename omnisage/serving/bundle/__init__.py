"""The serving-bundle format shared by every system: writer.py writes, loader.py loads (no model code)."""
