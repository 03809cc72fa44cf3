"""The serving-bundle format shared by every system: writer.py writes it, loader.py loads it
(no model code)."""
