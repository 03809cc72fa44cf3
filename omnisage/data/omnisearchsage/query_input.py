"""The query tower's input: WordPiece ids, and with the lexical path the query's n-gram ids too.

With `model.query.lexical` (models/lexical_path.py) a query is ONE int32 row of width
`data.batch_query_len + data.query_lexical_len`: its WordPiece ids padded with 0 to
batch_query_len, then its stacked n-gram ids (`text.NgramVocab.encode`, the entity tower's
tokenisation) padded to query_lexical_len. One array keeps every consumer — the input pipeline,
the evaluators, the exported program, the serving cache key — unchanged in shape of code.

`QueryEncoder` does the same from raw text in pure Python (no TensorFlow), for serving and for
`TowerRunner.query_texts`; the prepared `entities/queries.parquet` holds both id lists
(`tokens`, `lexical`), written by prepare with the same two tokenisers.
"""

import os

import numpy as np

from omnisage.data import text


def lexical_len(config) -> int:
  """Width of the n-gram part of a query row: data.query_lexical_len with model.query.lexical,
  else 0 (no lexical path)."""
  if not config.model.query.get("lexical", False):
    return 0
  width = int(config.data.get("query_lexical_len", 0))
  if width <= 0:
    raise ValueError(f"model.query.lexical needs data.query_lexical_len > 0, got {width}")
  return width


def pad_rows(rows, width: int) -> tuple[np.ndarray, int]:
  """([N, width] int32 zero-padded rows, number of rows cut to width)."""
  out = np.zeros((len(rows), width), np.int32)
  cut = 0
  for i, r in enumerate(rows):
    n = min(len(r), width)
    out[i, :n] = r[:n]
    cut += len(r) > width
  return out, cut


class QueryEncoder:
  """Raw query texts -> the query tower's packed input rows.

  wordpiece: a `omnisage.data.tokenizer.WordPieceTokenizer`; ngram_vocab: the prepared
  `text.NgramVocab` (None, or lexical_len 0: WordPiece only, the tokenizer's own rows).
  """

  def __init__(self, wordpiece, ngram_vocab: text.NgramVocab | None = None, lexical_len: int = 0):
    if lexical_len and ngram_vocab is None:
      raise ValueError("lexical_len > 0 needs the n-gram vocabulary")
    self.wordpiece, self.ngram_vocab, self.lexical_len = wordpiece, ngram_vocab, lexical_len

  @classmethod
  def from_bundle(cls, bundle) -> "QueryEncoder":
    """The encoder a serving bundle's query tower expects (its manifest's tokenizer, and its
    ngram_vocab/ when dims.query_lexical_len > 0). bundle: a loaded Bundle or a directory."""
    from omnisage.data.tokenizer import WordPieceTokenizer
    wordpiece = WordPieceTokenizer.from_bundle(bundle)
    if isinstance(bundle, (str, os.PathLike)):
      import json
      path = os.fspath(bundle)
      with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        dims = json.load(f).get("dims", {})
    else:
      path, dims = bundle.path, bundle.manifest.get("dims", {})
    width = int(dims.get("query_lexical_len", 0))
    vocab = text.NgramVocab.load(os.path.join(path, "ngram_vocab")) if width else None
    return cls(wordpiece, vocab, width)

  def encode_batch(self, texts: list[str], length: int) -> np.ndarray:
    """[B, length (+ lexical_len)] int32: WordPiece ids padded/cropped to `length`, then the
    n-gram ids padded/cropped to lexical_len."""
    rows = self.wordpiece.encode_batch(texts, length)
    if not self.lexical_len:
      return rows
    ngrams, _ = pad_rows([self.ngram_vocab.encode(t) for t in texts], self.lexical_len)
    return np.concatenate([rows, ngrams], axis=1)
