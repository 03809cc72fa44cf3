"""Home-feed two-tower training (SPEC §3): state, step and trainer."""
