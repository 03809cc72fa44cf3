"""PinText training (SPEC §2): state, step and trainer."""
