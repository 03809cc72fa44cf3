"""OmniSearchSage serving (SPEC §1): checkpoint -> bundle (export.py), the search service
(service.py)."""
