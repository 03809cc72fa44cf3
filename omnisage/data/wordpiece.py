"""WordPiece vocabulary learning and query tokenisation (SPEC §1 "Query tower").

The ONLY omnisage module that imports TensorFlow (tensorflow-text's tokenizers are the fast path:
FastBertTokenizer does about a million short queries per second on one core). Nothing in omnisage
imports this module at import time; `prepare` imports it inside a function, so training and
serving never load TensorFlow. GPUs are hidden from TensorFlow so it cannot grab accelerator memory
that JAX needs.

Usage:
  vocab = learn_vocab(train_queries, vocab_size=8000, lower_case=True)
  tok = QueryTokenizer("prepared/query_vocab.txt", lower_case=True, max_len=64)
  ids = tok.tokenize(["red velvet cake"])   # [array([CLS, ..., SEP], dtype=int32)]
"""

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up banner out of prepare logs

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text as tf_text  # noqa: E402
from tensorflow_text.tools.wordpiece_vocab import (  # noqa: E402
  wordpiece_tokenizer_learner_lib as learner,
)

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  # TF was initialised before this module was imported (devices are fixed by then); nothing to do.
  pass

# [PAD] first so that padding id 0 is also the tokenizer's [PAD], as in BERT vocabularies.
RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BATCH = 200_000  # strings per TF call: large batches amortise the per-call overhead


def learn_vocab(texts: list[str], vocab_size: int, lower_case: bool,
                counts: list[int] | None = None) -> list[str]:
  """Learns a BERT WordPiece vocabulary (reserved tokens first) from `texts`.

  Each element of `texts` counts once, or `counts[i]` times: pass queries with their log
  multiplicity to weight frequent queries (distinct texts in the order they first occur, with
  their counts, give the vocabulary of the full stream: the same word counts, in the same first
  occurrence order). Words are split with BERT's BasicTokenizer (`lower_case` also strips accents,
  exactly as `QueryTokenizer(lower_case=True)` does), then tensorflow-text's learner picks
  sub-words, as its bert_vocab_from_dataset does. The result has at most `vocab_size` tokens
  (often a little fewer: the learner binary-searches a sub-word count threshold and stops within
  5% of the target).
  """
  from tensorflow_text.python.ops import bert_tokenizer
  tokenizer = bert_tokenizer.BasicTokenizer(lower_case=lower_case)
  texts = list(texts)
  counts = [1] * len(texts) if counts is None else list(counts)
  word_counts: collections.Counter = collections.Counter()
  for start in range(0, len(texts), _BATCH):
    words = tokenizer.tokenize(tf.constant(texts[start:start + _BATCH], tf.string))
    for row, n in zip(words.to_list(), counts[start:start + _BATCH]):
      for w in row:
        word_counts[w.decode("utf-8")] += n

  def learn(upper_thresh):
    # lower_thresh 2 (default 10): small query logs (the tiny config) would otherwise leave mostly
    # single characters.
    return learner.learn(word_counts, vocab_size, RESERVED_TOKENS, lower_thresh=2,
                         upper_thresh=upper_thresh)

  # The learner's binary search costs one full learning pass per step (~16 steps). When even the
  # lowest threshold gives no more than `vocab_size` tokens (a small corpus), that one pass is the
  # answer the search would reach too, so try it first.
  vocab = learn(upper_thresh=2)
  return vocab if len(vocab) <= vocab_size else learn(upper_thresh=None)


def write_vocab(vocab: list[str], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(t + "\n" for t in vocab)


def read_vocab(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


class QueryTokenizer:
  """[CLS] wordpieces [SEP], truncated to `max_len`, as int32 arrays.

  Works with a learned vocabulary or an existing BERT vocab.txt (multilingual cased, MiniLM
  uncased): [PAD] must be id 0; [UNK], [CLS] and [SEP] are looked up by name. `lower_case` must
  match the vocabulary (True for uncased vocabularies: lower-case, NFD, strip accents).
  """

  def __init__(self, vocab_path: str, lower_case: bool, max_len: int):
    if max_len < 2:
      raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    self.vocab = read_vocab(vocab_path)
    index = {t: i for i, t in enumerate(self.vocab)}
    if self.vocab[:1] != ["[PAD]"]:
      raise ValueError(f"{vocab_path}: [PAD] must be token 0, found {self.vocab[:1]}")
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in index]
    if missing:
      raise ValueError(f"{vocab_path}: missing special tokens {missing}")
    self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
    self.max_len = max_len
    self._tokenizer = tf_text.FastBertTokenizer(
        vocab=self.vocab, token_out_type=tf.int32, unknown_token="[UNK]",
        lower_case_nfd_strip_accents=lower_case)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def tokenize(self, texts: list[str]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(texts), _BATCH):
      ragged = self._tokenizer.tokenize(tf.constant(texts[start:start + _BATCH], tf.string))
      out.extend(self._wrap(ragged.flat_values.numpy(), ragged.row_splits.numpy()))
    return out

  def _wrap(self, values: np.ndarray, splits: np.ndarray) -> list[np.ndarray]:
    # Vectorised [CLS] + pieces[:max_len - 2] + [SEP]: compute every output position at once.
    n = len(splits) - 1
    keep = np.minimum(np.diff(splits), self.max_len - 2)
    lengths = keep + 2
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat = np.empty(int(ends[-1]) if n else 0, np.int32)
    flat[starts] = self.cls_id
    flat[ends - 1] = self.sep_id
    # Position j of row r's pieces goes to starts[r] + 1 + j, for j < keep[r].
    row = np.repeat(np.arange(n), keep)
    j = np.arange(row.shape[0]) - np.repeat(np.cumsum(keep) - keep, keep)
    flat[starts[row] + 1 + j] = values[splits[:-1][row] + j]
    return np.split(flat, ends[:-1])
