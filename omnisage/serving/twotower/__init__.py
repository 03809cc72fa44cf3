"""Home-feed two-tower serving (SPEC §3): the bundle (bundle.py), POST /v1/recommend
(service.py)."""
