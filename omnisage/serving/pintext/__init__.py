"""PinText serving (SPEC §2): the vocab + vectors bundle (export.py), read by
models.pintext.TextEmbedder."""
