"""PinText input (SPEC §2): word-id pairs per task (pairs.py), the Grain pipeline (pipeline.py)."""
