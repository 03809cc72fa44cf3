"""Home-feed two-tower input (SPEC §3): MovieLens examples and catalogue (examples.py), the same
layout on the per-user protocol (user_protocol.py), the Grain pipeline (pipeline.py)."""
