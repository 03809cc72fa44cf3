"""PinnerSage (SPEC §4) after training: the daily batch job (batch.py); medoid retrieval, the
online update and their HTTP routes (service.py)."""
