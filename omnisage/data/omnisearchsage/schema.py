"""The on-disk contract between `launch.py prepare` and training.

Everything that `prepare` writes and the trainer reads is named here, so the two sides cannot drift.
This module must stay importable without TensorFlow (training code imports it).

Prepared directory layout (`<prepared>/`):

  meta.json                      vocab sizes, entity counts, pair counts, bad-row counts, split time
  query_vocab.txt                WordPiece vocabulary of the query tower (id = line number)
  ngram_vocab/{trigram,unigram,bigram}.txt   entity n-gram vocabularies (id = line number)
  entities/pins.parquet          one row per pin,     row i has entity_index == i
  entities/products.parquet      one row per product, row i has entity_index == i
  entities/queries.parquet       one row per query,   row i has entity_index == i
  {train,eval}/<task>/shard-00000-of-00004.array_record   one training/eval pair per record

Entity tables (pins, products) columns:
  entity_index  int32    dense 0..N-1 (the id used everywhere after prepare)
  id            string   the raw id from the input tables
  tokens        list<int32>   stacked n-gram ids (see `stacked id space` below), in field order
  fields        list<int8>    FIELDS index of each token (same length as tokens)
  legacy        list<float32> or null   PinSage (pins) / ItemSage (products) 256-d vector
  visual        list<float32> or null   1024-d visual feature in [0, 1]: a pin's unpacked bits, a
                                        product's mean of its images' unpacked bits
  title         string   normalised title (for people reading results, and for serving later)
Queries table columns:
  entity_index  int32
  text          string   normalised query text
  tokens        list<int32>   WordPiece ids including [CLS] ... [SEP], length <= query_max_len
  lexical       list<int32>   the text's stacked n-gram ids, as an entity title's (the query
                              tower's lexical path; query_input.py)

Stacked id space (SPEC §1): id 0 is padding; trigram ids 1..T; unigram ids T+1..T+U; bigram ids
T+U+1..T+U+B; V = 1 + T + U + B. Out-of-vocabulary tokens are dropped.
"""

import json
import os
import struct

import numpy as np

# Text fields of the unified pin/product tower, in the order tokens are laid out. Index = field id.
FIELDS = (
    "title",
    "description",
    "caption",
    "board_titles",
    "engaged_queries_save",
    "engaged_queries_long_click",
    "engaged_queries_add_to_cart",
    "engaged_queries_checkout",
)
FIELD_INDEX = {name: i for i, name in enumerate(FIELDS)}

# Engagement types of the logs. Index = engagement code stored in records.
ENGAGEMENTS = ("save", "long_click", "add_to_cart", "checkout", "click")
ENGAGEMENT_INDEX = {name: i for i, name in enumerate(ENGAGEMENTS)}

# Entity kinds, and the training tasks that pair a query with one of them (SPEC §1 "Loss").
ENTITY_KINDS = ("pins", "products", "queries")
# task name -> entity kind of its positive. Compatibility tasks reuse the q2pin / q2product pairs
# and score the query against the frozen legacy vector of the positive (they have no shards).
TASK_ENTITY = {"q2pin": "pins", "q2product": "products", "q2query": "queries"}
COMPAT_TASKS = {"q2pinsage": "q2pin", "q2itemsage": "q2product"}
LEGACY_DIM = 256
VISUAL_DIM = 1024

# Raw input tables read by prepare (Parquet), and their required columns. Synthetic data and the
# real-data loaders both produce exactly these.
RAW_TABLES = {
    "queries_log": ("query", "entity_kind", "entity_id", "engagement", "timestamp"),
    "pins": ("id", "title", "description", "caption", "pinsage", "visual_bits"),
    "products": ("id", "title", "description", "itemsage", "image_bits"),
    "board_saves": ("pin_id", "board_title", "timestamp"),
}
# Raw tables prepare reads when their file exists (and ignores otherwise):
#   judged_negatives   (query, entity_kind, entity_id): entities judged NOT relevant to a query
#                      (e.g. Home Depot relevance < 2); they become per-row hard negatives of the
#                      training pairs of that query
#                      (<prepared>/hard_negatives/<task>.judged.parquet)
OPTIONAL_RAW_TABLES = {
    "judged_negatives": ("query", "entity_kind", "entity_id"),
}

# The Arrow type of every raw column (required above, or optional: `split`, a product `caption`),
# as a family of types that prepare accepts; prepare checks them before it reads a value and names
# table, file, column, expected and found type when one differs. Every family also takes the Arrow
# `null` type (a column with no values) and dictionary-encoded values of the family. Columns that
# are not listed are ignored.
#   text           string | large_string. Valid UTF-8 (a string column holding other bytes is an
#                  error: write it as binary and the rows are counted as undecodable_text).
#   text_or_bytes  text | binary | large_binary (binary rows that are not UTF-8: undecodable_text)
#   seconds        any integer width, signed or unsigned: seconds since 1970-01-01 UTC; or an Arrow
#                  timestamp of any unit and zone (floored to seconds)
#   vector         list | large_list | fixed_size_list of float16 | float32 | float64
#   bits           binary | large_binary | fixed_size_binary (packed bits, VISUAL_DIM / 8 bytes)
#   bits_list      list | large_list | fixed_size_list of bits
RAW_TYPES = {
    "queries_log": dict(query="text_or_bytes", entity_kind="text", entity_id="text",
                        engagement="text", timestamp="seconds", split="text"),
    "pins": dict(id="text", title="text_or_bytes", description="text_or_bytes",
                 caption="text_or_bytes", pinsage="vector", visual_bits="bits"),
    "products": dict(id="text", title="text_or_bytes", description="text_or_bytes",
                     caption="text_or_bytes", itemsage="vector", image_bits="bits_list"),
    "board_saves": dict(pin_id="text", board_title="text_or_bytes", timestamp="seconds"),
    "judged_negatives": dict(query="text_or_bytes", entity_kind="text", entity_id="text"),
}
# Family -> the words an error message uses for it.
RAW_TYPE_FAMILIES = {
    "text": "string or large_string",
    "text_or_bytes": "string, large_string, binary or large_binary",
    "seconds": "an integer (seconds since 1970-01-01 UTC) or an Arrow timestamp",
    "vector": "list, large_list or fixed_size_list of float16/float32/float64",
    "bits": "binary, large_binary or fixed_size_binary",
    "bits_list": "list, large_list or fixed_size_list of binary, large_binary or fixed_size_binary",
}

# --- pair records -------------------------------------------------------------------------------
# One record = one (query, positive entity) pair:
#   int64 query_index, entity_index, engagement, timestamp; then the int32 query tokens.
_HEADER = struct.Struct("<qqqq")


def encode_pair(query_index: int, entity_index: int, engagement: int, timestamp: int,
                query_tokens) -> bytes:
  tokens = np.asarray(query_tokens, dtype="<i4")
  return _HEADER.pack(query_index, entity_index, engagement, timestamp) + tokens.tobytes()


def decode_pair(record: bytes) -> dict:
  query_index, entity_index, engagement, timestamp = _HEADER.unpack_from(record, 0)
  tokens = np.frombuffer(record, dtype="<i4", offset=_HEADER.size)
  return dict(query_index=query_index, entity_index=entity_index, engagement=engagement,
              timestamp=timestamp, query_tokens=tokens)


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def vocab_sizes_of(prepared_dir: str) -> dict:
  """{"query": WordPiece vocabulary size, "ngram": n-gram vocabulary size V} of a prepared dir."""
  path = os.path.join(prepared_dir, "meta.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` first")
  with open(path) as f:
    meta = json.load(f)
  return {"query": int(meta["vocab"]["query"]), "ngram": int(meta["vocab"]["V"])}
