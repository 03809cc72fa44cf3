"""BM25 lexical retrieval, the baseline of the real-data benchmarks (bm25s, Lù 2024).

The datasets README measured its Home Depot figures with bm25s, an English Snowball stemmer
(PyStemmer) and English stopwords; this wrapper fixes exactly that setup so every benchmark uses
the same baseline. bm25s' defaults are Lucene's BM25 (k1 1.5, b 0.75).

Usage:
  bm25 = BM25Index(corpus_titles)
  scores = bm25.scores(["angle bracket", ...])   # [queries, corpus] float32
  rows = bm25.top_k(["angle bracket"], k=10)      # [queries, k] corpus rows, best first
"""

from collections.abc import Sequence

import numpy as np


class BM25Index:

  def __init__(self, corpus: Sequence[str] | None, language: str = "english"):
    import bm25s  # lazy: the index build, the query service and the benchmarks need it
    import Stemmer

    self._bm25s = bm25s
    self.language = language
    self.stemmer = Stemmer.Stemmer(language)
    self.stopwords = "en" if language == "english" else None
    self.size = 0 if corpus is None else len(corpus)
    self.model = bm25s.BM25()
    if corpus is not None:
      self.model.index(self._tokenize(corpus), show_progress=False)

  def save(self, directory: str) -> None:
    """The index as bm25s' own files (sparse matrix, vocabulary, parameters; no pickle)."""
    self.model.save(directory, show_progress=False)

  @classmethod
  def load(cls, directory: str, size: int, language: str = "english") -> "BM25Index":
    index = cls(None, language)
    index.model = index._bm25s.BM25.load(directory, show_progress=False, allow_pickle=False)
    index.size = size
    return index

  def _tokenize(self, texts: Sequence[str]):
    return self._bm25s.tokenize(list(texts), stopwords=self.stopwords, stemmer=self.stemmer,
                                show_progress=False)

  def scores(self, queries: Sequence[str]) -> np.ndarray:
    """[len(queries), corpus] BM25 scores (0 where no term matches)."""
    out = np.zeros((len(queries), self.size), np.float32)
    tokenized = self._bm25s.tokenize(list(queries), stopwords=self.stopwords,
                                     stemmer=self.stemmer, show_progress=False, return_ids=False)
    for i, terms in enumerate(tokenized):
      if terms:
        out[i] = self.model.get_scores(terms)
    return out

  def top_k(self, queries: Sequence[str], k: int = 10) -> np.ndarray:
    return self.search(queries, k)[1]

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """([len(queries), k'] scores, [len(queries), k'] corpus rows), best first (ties: lower
    row), k' = min(k, corpus size)."""
    s = self.scores(queries)
    rows = np.argsort(-s, axis=1, kind="stable")[:, :min(k, self.size)]
    return np.take_along_axis(s, rows, axis=1), rows
