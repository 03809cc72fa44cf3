"""Raw pin/product rows in, embeddings out: a serving bundle featurises new entities itself.

A catalogue grows every day; embedding a new product must not need the training code or a rerun
of `prepare`. The bundle carries what prepare used (ngram_vocab/, and the manifest's
`featurization`: per-field and total token caps, the text-length limit), and
`omnisage.data.omnisearchsage.entity_rows.featurize_raw_entities` is prepare's own code, in pure
Python (no TensorFlow), so a raw row embeds to exactly the vector its prepared row would get.

Input: the columns of `schema.RAW_TABLES[kind]` (the same raw table prepare reads). Every column
is required: one that is absent is an error naming it, never a silent zero (a null VALUE is the
entity's missing feature, as in training). A row prepare would reject is an error naming the row
and reason, with the counts; nothing is dropped silently.

Usage:
  out = embed_raw_entities(load_bundle("runs/homedepot/serve/bundle"), table, "products")
  out["ids"], out["embeddings"]        # [n] ids, [n, embed_dim] float32 in input row order
"""

import os

import ml_collections
import numpy as np
import pyarrow as pa

from omnisage.data import text
from omnisage.data.omnisearchsage.entity_rows import featurize_raw_entities
from omnisage.serving.bundle.loader import Bundle, BundleError


def raw_featurizer(bundle: Bundle):
  """(n-gram vocabulary, data config) a bundle featurises raw rows with (read once per bundle)."""
  key = (bundle.path, bundle.manifest["files"]["params.safetensors"]["sha256"])
  if key not in _FEATURIZERS:
    _FEATURIZERS.clear()   # one bundle at a time in practice: keep memory bounded
    _FEATURIZERS[key] = _read_featurizer(bundle)
  return _FEATURIZERS[key]


_FEATURIZERS: dict = {}


def _read_featurizer(bundle: Bundle):
  spec = bundle.manifest.get("featurization")
  if not isinstance(spec, dict):
    raise BundleError(f"{bundle.path}/manifest.json has no 'featurization' (exported before raw "
                      "rows could be embedded): export the checkpoint again")
  vocab = text.NgramVocab.load(os.path.join(bundle.path, "ngram_vocab"))
  return vocab, ml_collections.ConfigDict({k: int(v) for k, v in spec.items()})


def featurize_for_bundle(bundle: Bundle, table: pa.Table, kind: str, where: str,
                         featurizer=None, first_row: int = 0) -> tuple[pa.RecordBatch, dict]:
  """Raw rows -> (a record batch laid out as a prepared entities table, with entity_index =
  first_row + the input row; the featurised columns)."""
  vocab, d = featurizer or raw_featurizer(bundle)
  ents, bad = featurize_raw_entities(table, kind, vocab, d, where)
  if bad:
    shown = ", ".join(f"row {r}: {reason}" for r, reason in ents["rejected"].items())
    raise ValueError(f"{where}: {sum(bad.values())} of {table.num_rows} rows cannot be embedded "
                     f"({bad}); first: {shown}")
  n = len(ents["ids"])
  batch = pa.record_batch({
      "entity_index": pa.array(np.asarray(ents["rows"], np.int64) + first_row, pa.int32()),
      "id": pa.array([str(i) for i in ents["ids"]], pa.string()),
      "title": pa.array(ents["title"], pa.string()),
      "tokens": ents["tokens"], "fields": ents["fields"],
      "legacy": ents["legacy"], "visual": ents["visual"]})
  assert batch.num_rows == n
  return batch, ents


def embed_raw_entities(bundle: Bundle, table: pa.Table, kind: str, where: str = "raw rows",
                       batch_size: int = 1024) -> dict:
  """{"ids": [n], "embeddings": [n, embed_dim] float32} of raw `kind` rows, in input order."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  from omnisage.serving.index.embed import embed_record_batch  # embed.py imports this module
  featurizer = raw_featurizer(bundle)
  ids, vectors = [], []
  for start in range(0, table.num_rows, batch_size):
    part = table.slice(start, batch_size)
    batch, ents = featurize_for_bundle(bundle, part, kind, f"{where} (rows {start}..)",
                                       featurizer)
    vectors.append(embed_record_batch(bundle, kind, batch, batch_size))
    ids.extend(str(i) for i in ents["ids"])
  dim = int(bundle.dims["embed_dim"])
  return {"ids": ids,
          "embeddings": np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)}
