"""Query WordPiece tokenizer for serving, pure Python (SPEC §1 "Serving": online query embeddings).

Two normalisations, chosen by WordPieceTokenizer(..., normalization=...):

"tf_text" (the default). The query tower was trained on ids from
omnisage.data.wordpiece.QueryTokenizer, i.e. tf-text's FastBertTokenizer (end-to-end mode:
no_pretokenization=False, max_bytes_per_word=100, unknown_token "[UNK]"). A server must not import
TensorFlow, so this mode reproduces those ids exactly with the standard library and NumPy
(tests/test_tokenizer.py compares them list by list):

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

"huggingface". sentence-transformers checkpoints (all-MiniLM-L6-v2, used by
omnisage.baselines.text_encoder) are tokenised by HuggingFace tokenizers' BertTokenizerFast, whose
normalisation differs from tf-text's on real text: mojibake in Home Depot titles such as U+0089 or
'ª' gave other ids, and those titles other embeddings than sentence-transformers'. This mode
reproduces tokenizer.json's BertNormalizer(clean_text, handle_chinese_chars, strip_accents=None,
lowercase) + BertPreTokenizer + WordPiece + "[CLS] $A [SEP]" (tests/test_tokenizer.py compares it
with the real library):

1. Split off the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] where the raw text spells them
   (case-sensitive; they are added tokens that are not normalised): each is its own id.
2. Normalise each code point on its own. Deleted: U+0000, U+FFFD and every Cc, Cf, Co, Cs except
   tab, LF and CR. Whitespace (White_Space) becomes a space. CJK ideographs get a space on either
   side (tokenizers' ranges, which miss U+2B820..U+2B91F). With lower_case: NFD, drop Mn, then
   lowercase each character on its own (so 'Σ' is always 'σ'). No compatibility folding: 'ª', 'ﬁ'
   and full-width letters stay as they are.
3. Split words on whitespace; every punctuation character (ASCII !-/ :-@ [-` {-~, Unicode P*) is
   a word of its own.
4. Each word: greedy longest-match-first WordPiece with "##" continuations. A word longer than 100
   characters (not bytes), or one that cannot be matched to the end, becomes a single [UNK].
5. [CLS] pieces[:max_len - 2] [SEP], as sentence-transformers truncates.

tokenizers classifies characters with tables of three Unicode versions: Rust's std (lowercase,
whitespace; Unicode 17), unicode-normalization-alignments (NFD) and unicode_categories (Cc/Cf/Mn/P*;
Unicode 8, and it has no Cn: unassigned code points are kept). The code points where that disagrees
with Python's Unicode 14 are patched from the _HF_* tables below, read off tokenizers 0.22.2 code
point by code point. Per code point is exact but for NFD's canonical reordering of two adjacent
combining Mc characters (musical symbols and the like: never seen in text).

Words are memoised (an LRU cache per tokenizer), so a typical query costs a few microseconds.

Usage:
  tok = WordPieceTokenizer.from_bundle(load_bundle("runs/demo/bundle"))   # or a bundle directory
  tok = WordPieceTokenizer("prepared/query_vocab.txt", lower_case=True, max_len=64)
  tok = WordPieceTokenizer(f"{minilm}/vocab.txt", True, 256, normalization="huggingface")
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
MAX_CHARS_PER_WORD = 100   # tokenizers' WordPiece max_input_chars_per_word (BERT's tokenizer.json)
NORMALIZATIONS = ("tf_text", "huggingface")
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
  the P* categories). Built once per process."""
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


# huggingface mode (tokenizers 0.22.2's BertNormalizer and BertPreTokenizer). Its CJK ranges:
_HF_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_HF_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")   # BertTokenizerFast's added tokens
# Code points that unicode_categories (Unicode 8) classifies otherwise than Python's Unicode 14, as
# "first[-last]" hex ranges. Mn since Unicode 8 (kept: unknown to it, so not stripped as accents):
_HF_NEW_MARKS = (
    "7FD 898-89F 8CA-8E1 9FE AFA-AFF B55 C04 C3C D00 D3B-D3C D81 EBA 180F 1885-1886 1ABF-1ACE "
    "1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAC 10F46-10F50 10F82-10F85 11070 "
    "11073-11074 110C2 111C9 111CF 1123E 1133B 11438-1143F 11442-11444 11446 1145E 1182F-11837 "
    "11839-1183A 1193B-1193C 1193E 11943 119D4-119D7 119DA-119DB 119E0 11A01-11A0A 11A33-11A38 "
    "11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A99 11C30-11C36 11C38-11C3D "
    "11C3F 11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D "
    "11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11EF3-11EF4 16F4F 16FE4 1CF00-1CF2D 1CF30-1CF46 "
    "1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF "
    "1E944-1E94A")
_HF_OLD_MARKS = "1734"                                 # Mn in Unicode 8, Mc now: stripped
_HF_NEW_FORMAT = "890-891 8E2 110CD 13430-13438"       # Cf since Unicode 8: kept
# P* since Unicode 8 (not split off), and punctuation in Unicode 8 but no longer (split off):
_HF_NEW_PUNCT = (
    "61D 9FD A76 C77 C84 1B7D-1B7E 2E43-2E4F 2E52-2E5D 10EAD 10F55-10F59 10F86-10F89 1144B-1144F "
    "1145A-1145B 1145D 11660-1166C 116B9 1183B 11944-11946 119E2 11A3F-11A46 11A9A-11A9C "
    "11A9E-11AA2 11C41-11C45 11C70-11C71 11EF7-11EF8 11FFF 12FF1-12FF2 16E97-16E9A 16FE2 "
    "1E95E-1E95F")
_HF_OLD_PUNCT = "166D 111C9"
_HF_NO_NFD = "11938"   # a canonical decomposition newer than unicode-normalization-alignments'
# Rust's to_lowercase for letters unassigned in Unicode 14, in _NEW_LOWER's format:
_HF_NEW_LOWER = ("1C89:1C8A A7CB:264 A7CC:A7CD A7CE:A7CF A7D2:A7D3 A7D4:A7D5 A7DA:A7DB A7DC:19B "
                 "10D50-10D65:10D70 16EA0-16EB8:16EBB")


@functools.cache
def _hf_set(spec: str) -> frozenset[int]:
  return frozenset(cp for a, b in _ranges(spec) for cp in range(a, b + 1))


@functools.cache
def _hf_lower_table() -> dict[int, str]:
  table = {}
  for item in _HF_NEW_LOWER.split():
    span, _, target = item.partition(":")
    (first, last), = _ranges(span)
    table.update((cp, chr(int(target, 16) + cp - first)) for cp in range(first, last + 1))
  return table


def normalize_char_hf(ch: str, lower_case: bool) -> str:
  """tokenizers' BertNormalizer image of one code point (module docstring, "huggingface" step 2)."""
  cp = ord(ch)
  category = unicodedata.category(ch)
  if cp == 0xFFFD or (category in ("Cc", "Cf", "Co", "Cs") and ch not in "\t\n\r"
                      and cp not in _hf_set(_HF_NEW_FORMAT)):
    return ""   # clean_text: NUL, U+FFFD and unicode_categories' "other" are deleted
  if ch.isspace():
    return " "
  out = f" {ch} " if _in(cp, _HF_CJK) else ch
  if lower_case:   # strip_accents (None: follows lowercase), then lowercase, each per character
    if cp not in _hf_set(_HF_NO_NFD):
      out = unicodedata.normalize("NFD", out)
    out = "".join(c for c in out if not _is_mark_hf(c))
    lower = _hf_lower_table()
    out = "".join(lower.get(ord(c)) or c.lower() for c in out)
  return out


def _is_mark_hf(ch: str) -> bool:
  """unicodedata's Mn as unicode_categories (Unicode 8) sees it: what strip_accents drops."""
  cp = ord(ch)
  if unicodedata.category(ch) == "Mn":
    return cp not in _hf_set(_HF_NEW_MARKS)
  return cp in _hf_set(_HF_OLD_MARKS)


def is_punctuation_hf(ch: str) -> bool:
  """BertPreTokenizer's is_bert_punc: ASCII punctuation or unicode_categories' P*."""
  cp = ord(ch)
  if cp < 128:
    return _in(cp, _ASCII_PUNCT)
  if unicodedata.category(ch)[0] == "P":
    return cp not in _hf_set(_HF_NEW_PUNCT)
  return cp in _hf_set(_HF_OLD_PUNCT)


_MAX_CACHED_CHARS = 1 << 16   # clients sending every code point there is cannot grow it further


class _CharMap(dict):
  """str.translate table that fills itself, one Python call per distinct code point ever: the
  normalised image of a character, with spaces around each punctuation character in it.

  After that, str.split() yields exactly the words of step 2 (tf_text) or 3 (huggingface):
  Python's whitespace (str.isspace) and ICU's or Rust's White_Space differ only on U+001C..U+001F,
  which are Cc and so already spaces (tf_text) or deleted (huggingface).
  """

  def __init__(self, lower_case: bool, normalization: str = "tf_text"):
    super().__init__()
    self.lower_case, self.hf = lower_case, normalization == "huggingface"
    for cp in range(128):   # warm: ASCII and the punctuation class before the first request
      self[cp]

  def __missing__(self, cp: int) -> str:
    if self.hf:
      out = "".join(f" {c} " if is_punctuation_hf(c) else c
                    for c in normalize_char_hf(chr(cp), self.lower_case))
    else:
      out = _punctuation().sub(r" \g<0> ", normalize_char(chr(cp), self.lower_case))
    if len(self) < _MAX_CACHED_CHARS:
      self[cp] = out
    return out


class WordPieceTokenizer:
  """[CLS] wordpieces [SEP] as int32 arrays, id for id what QueryTokenizer (tf-text) produces, or
  with normalization="huggingface" what HuggingFace's BertTokenizerFast produces."""

  def __init__(self, vocab_path: str, lower_case: bool, max_len: int, cache_words: int = 1 << 18,
               normalization: str = "tf_text"):
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
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
    self.normalization = normalization
    self.unk_id, self.cls_id, self.sep_id = index[UNKNOWN], index["[CLS]"], index["[SEP]"]
    # Word-initial pieces and "##" continuations, keyed by their text without "##". Tokens with
    # punctuation inside can never match a word (words never contain punctuation), as in tf-text.
    self._first = {t: i for t, i in index.items() if t and not t.startswith(SUFFIX)}
    self._rest = {t[len(SUFFIX):]: i for t, i in index.items()
                  if t.startswith(SUFFIX) and len(t) > len(SUFFIX)}
    self._longest = max(map(len, (*self._first, *self._rest)))
    self._chars = _CharMap(self.lower_case, normalization)
    self._specials = None
    if normalization == "huggingface":
      # Added tokens, matched in the raw text before normalisation (leftmost, longest first).
      special = sorted((t for t in _HF_SPECIAL if t in index), key=len, reverse=True)
      self._special_ids = {t: index[t] for t in special}
      self._specials = re.compile("(" + "|".join(map(re.escape, special)) + ")")
    self._word_ids = functools.lru_cache(maxsize=cache_words)(self._wordpiece)

  @classmethod
  def from_bundle(cls, bundle) -> "WordPieceTokenizer":
    """From a loaded Bundle (omnisage.serving.bundle.loader) or a bundle directory."""
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
    # load_bundle has already confined tokenizer.vocab to the bundle; a bare directory (or any
    # other object) has not, so the path is checked again here before it is opened.
    root = os.path.realpath(path)
    vocab = spec["vocab"]
    full = os.path.realpath(os.path.join(root, vocab)) if isinstance(vocab, str) else ""
    if not full.startswith(root + os.sep) or os.path.isabs(vocab):
      raise ValueError(f"{path}/manifest.json: field 'tokenizer.vocab' {vocab!r} must be a file "
                       "inside the bundle directory")
    return cls(full, spec["lower_case"], spec["max_len"])

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def pieces(self, text: str) -> list[int]:
    """WordPiece ids of `text`, without [CLS]/[SEP] and without truncation."""
    if self._specials is not None and "[" in text:
      ids: list[int] = []
      for i, part in enumerate(self._specials.split(text)):
        # re.split with one group: the special tokens are the odd items.
        ids.extend((self._special_ids[part],) if i % 2 else self._words(part))
      return ids
    return self._words(text)

  def _words(self, text: str) -> list[int]:
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
    if self.normalization == "huggingface":
      too_long = len(word) > MAX_CHARS_PER_WORD   # characters
    else:
      size = len(word) if word.isascii() else len(word.encode("utf-8", "surrogatepass"))
      too_long = size > MAX_BYTES_PER_WORD        # UTF-8 bytes
    if too_long:
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
