"""Query WordPiece tokenizer for serving, pure Python (SPEC §1 "Serving": online query embeddings).

The query tower was trained on ids from omnisage.data.wordpiece.QueryTokenizer, i.e. tf-text's
FastBertTokenizer (end-to-end mode: no_pretokenization=False, max_bytes_per_word=100,
unknown_token "[UNK]"). A server must not import TensorFlow, so this module reproduces those ids
exactly with the standard library and NumPy (tests/test_tokenizer.py compares them list by list):

1. Normalise each code point on its own, as FastBertNormalizer's per-code-point table does. With
   lower_case: ICU NFKC_Casefold (which also deletes default-ignorable code points such as U+200B),
   then NFD, then drop Mn (accents). Always: Cc and Cf become a space.
2. Split words on White_Space; every punctuation character (ASCII !-/ :-@ [-` {-~, Unicode P*) and
   every CJK ideograph is a word of its own.
3. Each word: greedy longest-match-first WordPiece with "##" continuations. A word longer than 100
   UTF-8 bytes, or one that cannot be matched to the end, becomes a single [UNK].
4. [CLS] pieces[:max_len - 2] [SEP].

Python 3.11's unicodedata is Unicode 14; tensorflow-text's ICU and RE2 know Unicode 16. The few code
points assigned since (a few hundred, none common in queries) whose normalisation or punctuation
class matters are patched from the tables below, which were read off FastBertTokenizer itself.

Words are memoised (an LRU cache per tokenizer), so a typical query costs a few microseconds.

Usage:
  tok = WordPieceTokenizer.from_bundle(load_bundle("runs/demo/bundle"))   # or a bundle directory
  tok = WordPieceTokenizer("prepared/query_vocab.txt", lower_case=True, max_len=64)
  ids = tok.tokenize(["red velvet cake"])          # [array([CLS, ..., SEP], dtype=int32)]
  batch = tok.encode_batch(["red velvet cake"], 16)  # int32 [1, 16], zero-padded / cropped
"""

import functools
import json
import os
import re
import unicodedata

import numpy as np

MAX_BYTES_PER_WORD = 100   # FastBertTokenizer's max_bytes_per_word default
SUFFIX = "##"
UNKNOWN = "[UNK]"

# BERT's "Chinese character" blocks: each such ideograph is a word of its own.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# ASCII symbols BERT splits off, though Unicode does not call all of them punctuation ($, +, ^).
_ASCII_PUNCT = ((33, 47), (58, 64), (91, 96), (123, 126))
# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties): ICU's NFKC_Casefold deletes these.
# unicodedata has no such property, hence the list.
_DEFAULT_IGNORABLE = ((0xAD, 0xAD), (0x34F, 0x34F), (0x61C, 0x61C), (0x115F, 0x1160),
                      (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
                      (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
                      (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
                      (0xE0000, 0xE0FFF))

# Code points unassigned in Unicode 14 that FastBertTokenizer (Unicode 16) treats differently.
# Punctuation (word of its own), as "first[-last]" hex ranges:
_NEW_PUNCT = ("1B4E-1B4F 1B7F 10D6E 113D4-113D5 113D7-113D8 11B00-11B09 11BE1 11F43-11F4F "
              "16D6D-16D6F 1E5FF")
# Format characters (Cf): a space in both modes.
_NEW_FORMAT = "13439-1343F"
# lower_case normalisation, as "first[-last]:targets": targets are '.'-separated hex code points of
# the first one's image (a range shifts its single target along); no targets = deleted (new Mn).
_NEW_LOWER = (
    "ECE: 1C89:1C8A A7CB:264 A7CC:A7CD A7DA:A7DB A7DC:19B 105C9:105D2 105E4:105DA "
    "10D50-10D65:10D70 10EFD-10EFF: 11241: 11383:11382.113C9 11385:11384.113BB 1138E:1138B.113C2 "
    "11391:11390.113C9 113C5:113C2.113C2 113C7:113C2.113B8 113C8:113C2.113C9 11F00-11F01: "
    "11F36-11F3A: 11F40: 11F42: 13440: 13447-13455: 16121:1611E.1611E 16122:1611E.16129 "
    "16123:1611E.1611F 16124:16129.1611F 16125:1611E.16120 16126:1611E.1611E.1611F "
    "16127:1611E.16129.1611F 16128:1611E.1611E.16120 16D68:16D67.16D67 16D69:16D63.16D67 "
    "16D6A:16D63.16D67.16D67 1CCD6-1CCEF:61 1CCF0-1CCF9:30 1E030-1E038:430 1E039-1E03B:43A "
    "1E03C-1E046:43E 1E047:44B 1E048-1E049:44D 1E04A:A689 1E04B:4D9 1E04C:456 1E04D:458 "
    "1E04E:4E9 1E04F:4AF 1E050:4CF 1E051-1E059:430 1E05A-1E05B:43A 1E05C-1E05D:43E 1E05E:441 "
    "1E05F-1E064:443 1E065-1E066:44A 1E067:491 1E068:456 1E069:455 1E06A:45F 1E06B:4AB "
    "1E06C:A651 1E06D:4B1 1E08F: 1E4EC-1E4EF:")


def _ranges(spec: str):
  for item in spec.split():
    first, _, last = item.partition("-")
    yield int(first, 16), int(last or first, 16)


_NEW_PUNCT_RANGES = tuple(_ranges(_NEW_PUNCT))


def _in(cp: int, ranges) -> bool:
  return any(a <= cp <= b for a, b in ranges)


@functools.cache
def _new_chars(lower_case: bool) -> dict[int, str]:
  """The normalised image of each code point the patch tables name, for one mode."""
  table = {}
  for item in _NEW_LOWER.split() if lower_case else ():
    span, _, targets = item.partition(":")
    (first, last), = _ranges(span)
    image = [int(t, 16) for t in targets.split(".") if t]
    for cp in range(first, last + 1):
      # A range has a single target that shifts along with the source code point.
      table[cp] = "".join(chr(t + cp - first) for t in image)
  for first, last in _ranges(_NEW_FORMAT):
    table.update((cp, " ") for cp in range(first, last + 1))
  return table


def normalize_char(ch: str, lower_case: bool) -> str:
  """FastBertNormalizer's image of one code point (see the module docstring, step 1)."""
  cp = ord(ch)
  patched = _new_chars(lower_case).get(cp)
  if patched is not None:
    return patched
  out = ch
  if lower_case:
    if _in(cp, _DEFAULT_IGNORABLE):
      return ""
    # NFKC_Casefold(c) = NFKC(casefold(NFKC(casefold(NFD(c))))): Unicode's closure definition,
    # which unicodedata's NFKC + str.casefold reproduce for every code point it knows.
    out = unicodedata.normalize("NFKC", unicodedata.normalize("NFD", out).casefold())
    out = unicodedata.normalize("NFKC", out.casefold())
    out = "".join(c for c in unicodedata.normalize("NFD", out) if unicodedata.category(c) != "Mn")
  return "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in out)


@functools.cache
def _punctuation() -> re.Pattern:
  """FastWordpieceTokenizer's IsPunctuationOrChineseChar as a character class (ICU u_ispunct is
  the P* categories). Built once per process, in about 0.3 s."""
  ranges = [*_ASCII_PUNCT, *_CJK, *_NEW_PUNCT_RANGES]
  start = None
  for cp in range(0x110001):
    inside = cp < 0x110000 and unicodedata.category(chr(cp))[0] == "P"
    if inside and start is None:
      start = cp
    elif not inside and start is not None:
      ranges.append((start, cp - 1))
      start = None
  return re.compile("[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "")
                                  for a, b in ranges) + "]")


_MAX_CACHED_CHARS = 1 << 16   # clients sending every code point there is cannot grow it further


class _CharMap(dict):
  """str.translate table that fills itself, one Python call per distinct code point ever: the
  normalised image of a character, with spaces around each punctuation character in it.

  After that, str.split() yields exactly the words of step 2: Python's whitespace (str.isspace)
  and ICU's White_Space differ only on U+001C..U+001F, which are Cc and so already spaces.
  """

  def __init__(self, lower_case: bool):
    super().__init__()
    self.lower_case = lower_case
    for cp in range(128):   # warm: ASCII and the punctuation class before the first request
      self[cp]

  def __missing__(self, cp: int) -> str:
    out = _punctuation().sub(r" \g<0> ", normalize_char(chr(cp), self.lower_case))
    if len(self) < _MAX_CACHED_CHARS:
      self[cp] = out
    return out


class WordPieceTokenizer:
  """[CLS] wordpieces [SEP] as int32 arrays, id for id what QueryTokenizer (tf-text) produces."""

  def __init__(self, vocab_path: str, lower_case: bool, max_len: int, cache_words: int = 1 << 18):
    if max_len < 2:
      raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f"{vocab_path}: vocabulary file not found")
    with open(vocab_path, encoding="utf-8") as f:
      # splitlines, as omnisage.data.wordpiece.read_vocab does, so ids line up with training.
      self.vocab = f.read().splitlines()
    index = {t: i for i, t in enumerate(self.vocab)}
    if len(index) != len(self.vocab):
      raise ValueError(f"{vocab_path}: tokens must be unique (tf-text refuses duplicates)")
    if self.vocab[:1] != ["[PAD]"]:
      raise ValueError(f"{vocab_path}: [PAD] must be token 0, found {self.vocab[:1]}")
    missing = [t for t in (UNKNOWN, "[CLS]", "[SEP]") if t not in index]
    if missing:
      raise ValueError(f"{vocab_path}: missing special tokens {missing}")
    spaced = [t for t in self.vocab if any(c.isspace() for c in t)]
    if spaced:
      # FastBertTokenizer's trie would match such a token across a word boundary; no BERT vocab
      # has one, so refuse rather than imitate that.
      raise ValueError(f"{vocab_path}: tokens with whitespace are not supported: {spaced[:3]}")
    self.lower_case, self.max_len = bool(lower_case), int(max_len)
    self.unk_id, self.cls_id, self.sep_id = index[UNKNOWN], index["[CLS]"], index["[SEP]"]
    # Word-initial pieces and "##" continuations, keyed by their text without "##". Tokens with
    # punctuation inside can never match a word (words never contain punctuation), as in tf-text.
    self._first = {t: i for t, i in index.items() if t and not t.startswith(SUFFIX)}
    self._rest = {t[len(SUFFIX):]: i for t, i in index.items()
                  if t.startswith(SUFFIX) and len(t) > len(SUFFIX)}
    self._longest = max(map(len, (*self._first, *self._rest)))
    self._chars = _CharMap(self.lower_case)
    self._word_ids = functools.lru_cache(maxsize=cache_words)(self._wordpiece)

  @classmethod
  def from_bundle(cls, bundle) -> "WordPieceTokenizer":
    """From a loaded Bundle (omnisage.serving.bundle) or a bundle directory."""
    if isinstance(bundle, (str, os.PathLike)):
      path = os.fspath(bundle)
      with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    else:
      path, manifest = bundle.path, bundle.manifest
    spec = manifest.get("tokenizer")
    if not isinstance(spec, dict) or spec.get("kind") != "bert_wordpiece":
      raise ValueError(f"{path}/manifest.json: field 'tokenizer' must be a dict with kind "
                       f"'bert_wordpiece', got {spec!r}")
    for key in ("vocab", "lower_case", "max_len"):
      if key not in spec:
        raise ValueError(f"{path}/manifest.json: field 'tokenizer.{key}' is missing")
    return cls(os.path.join(path, spec["vocab"]), spec["lower_case"], spec["max_len"])

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def pieces(self, text: str) -> list[int]:
    """WordPiece ids of `text`, without [CLS]/[SEP] and without truncation."""
    ids: list[int] = []
    for word in text.translate(self._chars).split():
      ids.extend(self._word_ids(word))
    return ids

  def tokenize(self, texts: list[str]) -> list[np.ndarray]:
    out = []
    for text in texts:
      if not isinstance(text, str):
        raise TypeError(f"texts must be strings, got {type(text).__name__}")
      ids = self.pieces(text)[: self.max_len - 2]
      out.append(np.array([self.cls_id, *ids, self.sep_id], np.int32))
    return out

  def encode_batch(self, texts: list[str], length: int) -> np.ndarray:
    """int32 [len(texts), length]: tokenize, then zero-pad or crop, as training batches are."""
    batch = np.zeros((len(texts), length), np.int32)
    for row, ids in enumerate(self.tokenize(texts)):
      ids = ids[:length]
      batch[row, : len(ids)] = ids
    return batch

  def _wordpiece(self, word: str) -> tuple[int, ...]:
    size = len(word) if word.isascii() else len(word.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES_PER_WORD:
      return (self.unk_id,)
    ids, start, vocab = [], 0, self._first
    while start < len(word):
      # Longest match first; no vocab piece is longer than self._longest characters.
      for end in range(min(len(word), start + self._longest), start, -1):
        piece = vocab.get(word[start:end])
        if piece is not None:
          break
      else:
        return (self.unk_id,)   # some suffix of the word matches nothing: the whole word is unknown
      ids.append(piece)
      start, vocab = end, self._rest
    return tuple(ids)
