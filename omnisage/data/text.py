"""Text normalisation and the n-gram tokenisation of the unified pin/product tower (SPEC §1).

SPEC §1 "Unified pin/product tower": every text field is normalised (NFKC + case folding) and
tokenised three ways: character trigrams with '#' at word boundaries, word unigrams, and word
bigrams "w1#w2". The three vocabularies are stacked into one id space (schema.py): id 0 is padding,
trigrams 1..T, unigrams T+1..T+U, bigrams T+U+1..T+U+B; out-of-vocabulary tokens are dropped.

This module has no TensorFlow dependency: training and serving import it.

Usage:
  vocab = NgramVocab.build(texts, trigram_size=30_000, unigram_size=30_000, bigram_size=60_000)
  ids = vocab.encode("Red Velvet cake")   # np.int32 stacked ids
"""

import collections
import os
import re
import unicodedata
from collections.abc import Iterable

import numpy as np

# Word boundary marker of trigrams and the joiner of bigrams. Words are runs of `\w` characters, so
# '#' can never occur inside a word and the marker cannot collide with text.
BOUNDARY = "#"
_WORD_RE = re.compile(r"\w+")
VOCAB_FILES = ("trigram.txt", "unigram.txt", "bigram.txt")


def normalize(text: str) -> str:
  """NFKC + case folding + whitespace collapsed to single spaces, stripped.

  NFKC runs again after casefold because folding can produce sequences that are not NFKC (e.g. a
  folded letter followed by a combining mark); the result is then stable under a second call.
  """
  text = unicodedata.normalize("NFKC", text).casefold()
  text = unicodedata.normalize("NFKC", text)
  return " ".join(text.split())


def words(text: str) -> list[str]:
  """Words of an already normalised text: maximal runs of `\\w` (punctuation separates words)."""
  return _WORD_RE.findall(text)


def word_trigrams(word: str) -> list[str]:
  """Trigrams of one word padded as '#word#': "cat" -> ["#ca", "cat", "at#"], "a" -> ["#a#"]."""
  padded = BOUNDARY + word + BOUNDARY
  return [padded[i:i + 3] for i in range(len(padded) - 2)]


def char_trigrams(text: str) -> list[str]:
  """Trigrams of every word of `normalize(text)`, word by word; no trigram spans two words."""
  return [g for w in words(normalize(text)) for g in word_trigrams(w)]


def unigrams(text: str) -> list[str]:
  return words(normalize(text))


def bigrams(text: str) -> list[str]:
  """Adjacent word pairs joined by '#': "red velvet cake" -> ["red#velvet", "velvet#cake"]."""
  ws = words(normalize(text))
  return [a + BOUNDARY + b for a, b in zip(ws[:-1], ws[1:])]


def _top(counter: collections.Counter, size: int) -> list[str]:
  # Most frequent first; ties by the token itself so the vocabulary does not depend on input order.
  return [t for t, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


class NgramVocab:
  """Three n-gram vocabularies and the stacked id space over them (see module docstring).

  Token order of `encode`: word by word, each word contributes its unigram, then the bigram with the
  previous word (if any), then its trigrams. Order does not matter to the sum-pooled field
  embedding, but it makes truncation (per-field caps) keep whole leading words instead of all the
  trigrams of a long text and none of its words.
  """

  def __init__(self, trigrams: list[str], unigrams: list[str], bigrams: list[str]):
    self.trigrams, self.unigrams, self.bigrams = list(trigrams), list(unigrams), list(bigrams)
    t, u = len(self.trigrams), len(self.unigrams)
    self.tri_index = {g: 1 + i for i, g in enumerate(self.trigrams)}
    self.uni_index = {w: 1 + t + i for i, w in enumerate(self.unigrams)}
    self.bi_index = {b: 1 + t + u + i for i, b in enumerate(self.bigrams)}
    self._word_cache: dict[str, tuple[int, list[int]]] = {}
    self._text_cache: dict[str, np.ndarray] = {}

  @property
  def size(self) -> int:
    """V = 1 + T + U + B (id 0 is padding)."""
    return 1 + len(self.trigrams) + len(self.unigrams) + len(self.bigrams)

  @classmethod
  def build(cls, texts: Iterable[str], trigram_size: int, unigram_size: int,
            bigram_size: int) -> "NgramVocab":
    """Keeps the most frequent n-grams of `texts` (each occurrence counts) up to each size."""
    text_counts = collections.Counter(texts)
    word_counts: collections.Counter = collections.Counter()
    bigram_counts: collections.Counter = collections.Counter()
    for text, c in text_counts.items():
      ws = words(normalize(text))
      for w in ws:
        word_counts[w] += c
      for a, b in zip(ws[:-1], ws[1:]):
        bigram_counts[a + BOUNDARY + b] += c
    # Trigram counts follow from word counts: far fewer distinct words than word occurrences.
    trigram_counts: collections.Counter = collections.Counter()
    for w, c in word_counts.items():
      for g in word_trigrams(w):
        trigram_counts[g] += c
    return cls(_top(trigram_counts, trigram_size), _top(word_counts, unigram_size),
               _top(bigram_counts, bigram_size))

  def save(self, directory: str) -> None:
    """Writes trigram.txt, unigram.txt, bigram.txt (one token per line; id in its vocab = line)."""
    os.makedirs(directory, exist_ok=True)
    for name, tokens in zip(VOCAB_FILES, (self.trigrams, self.unigrams, self.bigrams)):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in tokens)

  @classmethod
  def load(cls, directory: str) -> "NgramVocab":
    lists = []
    for name in VOCAB_FILES:
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        lists.append(f.read().splitlines())
    return cls(*lists)

  def _word(self, w: str) -> tuple[int, list[int]]:
    # (unigram id or 0, in-vocabulary trigram ids); words repeat a lot, so cache them.
    hit = self._word_cache.get(w)
    if hit is None:
      tri = self.tri_index
      hit = (self.uni_index.get(w, 0), [tri[g] for g in word_trigrams(w) if g in tri])
      self._word_cache[w] = hit
    return hit

  def encode(self, text: str) -> np.ndarray:
    """Stacked ids of `normalize(text)` in the order of the class docstring; OOV dropped."""
    hit = self._text_cache.get(text)
    if hit is not None:
      return hit
    ws = words(normalize(text))
    out: list[int] = []
    bi = self.bi_index
    for i, w in enumerate(ws):
      uni, tri = self._word(w)
      if uni:
        out.append(uni)
      if i:
        b = bi.get(ws[i - 1] + BOUNDARY + w)
        if b:
          out.append(b)
      out.extend(tri)
    ids = np.asarray(out, dtype=np.int32)
    ids.flags.writeable = False  # shared by the cache: callers must copy before editing
    # Entity fields repeat (board titles, engaged queries): caching makes prepare linear in the
    # number of distinct texts. The cache is bounded so serving cannot grow it without limit.
    if len(self._text_cache) < 2_000_000:
      self._text_cache[text] = ids
    return ids
