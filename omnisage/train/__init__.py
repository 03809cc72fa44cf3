"""omnisage.train: the shared training machinery at the root (loop.py, state.py, sharding.py,
checkpoint.py, losses.py, frequency.py, metrics.py), evaluators/, and one sub-package per trained
system (omnisearchsage/, twotower/, pintext/) plus the PinnerSage batch job (pinnersage.py)."""
