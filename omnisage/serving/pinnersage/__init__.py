"""PinnerSage serving (SPEC §4): medoid retrieval, the online update and its HTTP routes (service.py)."""
