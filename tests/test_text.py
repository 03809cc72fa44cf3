"""omnisage.data.text: normalisation, the trigram/unigram/bigram scheme and the stacked id space."""

import collections
import unicodedata

import numpy as np

from omnisage.data import text


def test_normalize_nfkc_casefold_whitespace():
  assert text.normalize("  Straße\t\u00a0ＣＡＦÉ \n ﬁne  ") == "strasse café fine"
  # Decomposed (NFD) accents compose to the same string as the precomposed form.
  assert text.normalize(unicodedata.normalize("NFD", "Crème Brûlée")) == "crème brûlée"
  assert text.normalize("") == "" and text.normalize(" \t ") == ""
  for s in ("Ǆemal İstanbul", "ΣΊΣΥΦΟΣ", "ﬀ ﬃ Ⅻ ①"):
    once = text.normalize(s)
    assert text.normalize(once) == once  # idempotent


def test_trigram_scheme():
  assert text.char_trigrams("cat") == ["#ca", "cat", "at#"]
  assert text.char_trigrams("a") == ["#a#"]
  assert text.char_trigrams("ab") == ["#ab", "ab#"]
  # Word by word (no trigram spans two words), after normalisation; punctuation splits words.
  assert text.char_trigrams("Hi, CAT") == ["#hi", "hi#", "#ca", "cat", "at#"]
  assert text.unigrams("Red  velvet-cake!") == ["red", "velvet", "cake"]
  assert text.bigrams("Red velvet cake") == ["red#velvet", "velvet#cake"]
  assert text.bigrams("one") == []


def _reference_ids(vocab: text.NgramVocab, s: str) -> list[int]:
  """Multiset of in-vocabulary stacked ids, straight from the definitions."""
  t, u = len(vocab.trigrams), len(vocab.unigrams)
  ids = [1 + vocab.trigrams.index(g) for g in text.char_trigrams(s) if g in vocab.trigrams]
  ids += [1 + t + vocab.unigrams.index(w) for w in text.unigrams(s) if w in vocab.unigrams]
  ids += [1 + t + u + vocab.bigrams.index(b) for b in text.bigrams(s) if b in vocab.bigrams]
  return sorted(ids)


CORPUS = ["red velvet cake", "Red Velvet cupcake", "chocolate cake", "carrot cake recipe",
          "vegan chocolate cake", "cake"] * 3 + ["rare words only once"]


def test_vocab_sizes_order_and_id_ranges():
  vocab = text.NgramVocab.build(CORPUS, trigram_size=25, unigram_size=6, bigram_size=4)
  t, u, b = len(vocab.trigrams), len(vocab.unigrams), len(vocab.bigrams)
  assert (t, u, b) == (25, 6, 4) and vocab.size == 1 + t + u + b
  # Most frequent first, ties by token: "cake" appears in 5 of 6 texts.
  word_counts = collections.Counter(w for s in CORPUS for w in text.unigrams(s))
  expected = sorted(word_counts, key=lambda w: (-word_counts[w], w))[:6]
  assert vocab.unigrams == expected and vocab.unigrams[0] == "cake"
  for s in CORPUS + ["unseen words entirely", "cake unseen"]:
    ids = vocab.encode(s)
    assert ids.dtype == np.int32
    assert sorted(ids.tolist()) == _reference_ids(vocab, s)
    assert ((ids >= 1) & (ids < vocab.size)).all()
  tri = vocab.encode("cake")
  kinds = np.digitize(tri, [1, 1 + t, 1 + t + u, 1 + t + u + b])
  assert set(kinds.tolist()) <= {1, 2}  # trigrams and a unigram, no bigram in a one-word text


def test_oov_dropped_and_word_order():
  vocab = text.NgramVocab.build(["aa bb"], trigram_size=100, unigram_size=100, bigram_size=100)
  assert vocab.encode("zzz qqq").size == 0
  ids = vocab.encode("aa bb").tolist()
  uni_aa, uni_bb = vocab.uni_index["aa"], vocab.uni_index["bb"]
  big = vocab.bi_index["aa#bb"]
  # Word by word: unigram, bigram with the previous word, then the word's trigrams.
  assert ids == [uni_aa] + [vocab.tri_index[g] for g in ("#aa", "aa#")] + [uni_bb, big] + [
      vocab.tri_index[g] for g in ("#bb", "bb#")]
  # An unknown word contributes nothing, and no bigram bridges over it.
  assert vocab.encode("aa zz bb").tolist() == [uni_aa, vocab.tri_index["#aa"],
                                                vocab.tri_index["aa#"], uni_bb,
                                                vocab.tri_index["#bb"], vocab.tri_index["bb#"]]


def test_save_load_roundtrip(tmp_path):
  vocab = text.NgramVocab.build(CORPUS, trigram_size=30, unigram_size=8, bigram_size=6)
  vocab.save(str(tmp_path))
  lines = {n: (tmp_path / n).read_text(encoding="utf-8").splitlines() for n in text.VOCAB_FILES}
  assert [len(lines[n]) for n in text.VOCAB_FILES] == [30, 8, 6]
  loaded = text.NgramVocab.load(str(tmp_path))
  assert loaded.size == vocab.size
  for s in CORPUS:
    np.testing.assert_array_equal(loaded.encode(s), vocab.encode(s))
