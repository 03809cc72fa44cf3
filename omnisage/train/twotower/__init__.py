"""Home-feed two-tower training (SPEC §3): state, step and trainer (trainer.py), the per-user
protocol's scoring of the model (protocol.py)."""
