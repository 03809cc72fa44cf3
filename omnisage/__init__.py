"""omnisage: accelerator-native embedding retrieval.

OmniSearchSage, PinText, the home-feed two-tower model and PinnerSage (../shared/docs/SPEC.md).
"""

__version__ = "0.1.0"
