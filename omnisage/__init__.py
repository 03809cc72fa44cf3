"""omnisage: accelerator-native embedding retrieval (OmniSearchSage, PinText, two-tower, PinnerSage)."""

__version__ = "0.1.0"
