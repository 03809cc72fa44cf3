"""Home-feed two-tower input (SPEC §3): MovieLens examples and catalogue (examples.py), the Grain
pipeline (pipeline.py)."""
