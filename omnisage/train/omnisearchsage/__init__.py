"""OmniSearchSage training (SPEC §1): train state, step, trainer, compile-only check (aot.py),
trained towers for full-corpus evaluation (towers.py)."""
