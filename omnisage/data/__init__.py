"""omnisage.data: raw tables -> prepared training data, per system.

Shared at the root: text normalisation and n-grams (text.py), WordPiece vocabulary learning with
TensorFlow (wordpiece.py, prepare only) and the pure-Python WordPiece tokenizer (tokenizer.py),
the public dataset loaders (sources/). One sub-package per system: omnisearchsage/, twotower/,
pintext/, pinnersage/."""
