"""A canonical digest of a prepared directory, to compare two implementations of `prepare`.

Two prepared directories are "the same output" when their digests are equal: the meta.json counts
and vocabulary sizes (not its timings or config echo), the bytes of every vocabulary file, every
entity-table column value in row order (and its Arrow type), per split and task the MULTISET
of pair records: which shard a pair lands in is a shuffle, so records are decoded
(schema.decode_pair), sorted and hashed together; and, only when prepare wrote any (a raw
judged_negatives table), each hard_negatives/*.parquet table column by column in row order.

tests/fixtures/prepare_tiny_digest.json is the digest of the tiny synthetic world prepared by
prepare.prepare before the Ray Data rewrite (issue 19); tests/test_prepare_ray.py holds every
implementation to it. Regenerate it only for an intended change of prepare's output:
  python -c "from tests.prepare_digest import write_tiny_fixture; write_tiny_fixture()"
"""

import glob
import hashlib
import json
import os

import pyarrow.parquet as pq

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "prepare_tiny_digest.json")
# meta.json keys that describe the output (not `seconds`, `config`).
META_KEYS = ("vocab", "query_vocab_source", "entities", "pairs", "dropped_pairs", "bad_rows",
             "judged_negatives", "raw_rows", "split", "features")


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return sha256_bytes(f.read())


def sha256_json(value) -> str:
  # repr-exact floats (float32 values widen to float64 exactly), so equal values hash equal.
  return sha256_bytes(json.dumps(value, separators=(",", ":")).encode())


def table_digest(path: str) -> dict:
  """{column: {"type": Arrow type, "sha256": of its values in row order}} plus the row count."""
  table = pq.read_table(path)
  out = {"rows": table.num_rows}
  for name in table.column_names:
    col = table[name]
    out[name] = {"type": str(col.type), "sha256": sha256_json(col.to_pylist())}
  return out


def pairs_digest(directory: str) -> dict:
  """Count and sorted-multiset sha256 of the decoded pair records of one <split>/<task> dir."""
  from array_record.python.array_record_module import ArrayRecordReader

  from omnisage.data.omnisearchsage import schema
  records = []
  paths = sorted(glob.glob(os.path.join(directory, "*.array_record")))
  for path in paths:
    reader = ArrayRecordReader(path)
    for r in reader.read_all():
      p = schema.decode_pair(r)
      records.append([p["query_index"], p["entity_index"], p["engagement"], p["timestamp"],
                      p["query_tokens"].tolist()])
    reader.close()
  records.sort()
  return {"shards": len(paths), "records": len(records), "sha256": sha256_json(records)}


def prepared_digest(prepared_dir: str) -> dict:
  """The canonical digest of a prepared directory (see the module docstring)."""
  from omnisage.data import text
  with open(os.path.join(prepared_dir, "meta.json")) as f:
    meta = json.load(f)
  digest = {"meta": {k: meta.get(k) for k in META_KEYS}}
  digest["files"] = {rel: sha256_file(os.path.join(prepared_dir, rel)) for rel in
                     ["query_vocab.txt"] + [f"ngram_vocab/{n}" for n in text.VOCAB_FILES]}
  digest["entities"] = {
      kind: table_digest(os.path.join(prepared_dir, "entities", f"{kind}.parquet"))
      for kind in ("pins", "products", "queries")}
  digest["pairs"] = {
      f"{split}/{task}": pairs_digest(os.path.join(prepared_dir, split, task))
      for split in ("train", "eval") for task in ("q2pin", "q2product", "q2query")}
  negatives = sorted(glob.glob(os.path.join(prepared_dir, "hard_negatives", "*.parquet")))
  if negatives:   # absent from the tiny world (and its frozen digest)
    digest["hard_negatives"] = {os.path.basename(p): table_digest(p) for p in negatives}
  return digest


def digest_diff(got: dict, want: dict, prefix: str = "") -> list[str]:
  """The paths of the leaves where two digests differ (readable test failures)."""
  if isinstance(got, dict) and isinstance(want, dict):
    out = []
    for k in sorted(set(got) | set(want), key=str):
      out += digest_diff(got.get(k), want.get(k), f"{prefix}/{k}")
    return out
  return [] if got == want else [f"{prefix}: {got!r} != {want!r}"]


def load_fixture() -> dict:
  with open(FIXTURE) as f:
    return json.load(f)


def write_tiny_fixture(path: str = FIXTURE) -> dict:
  """Prepares the tiny synthetic world (as conftest.py's `tiny_prepared`) and saves its digest."""
  import tempfile

  from omnisage.data.omnisearchsage import prepare, synthetic
  from tests.helpers import tiny_config
  config = tiny_config()
  with tempfile.TemporaryDirectory() as root:
    raw, out = os.path.join(root, "raw"), os.path.join(root, "prepared")
    synthetic.generate(config.synthetic, config.seed, raw)
    prepare.prepare(config, raw, out)
    digest = prepared_digest(out)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(digest, f, indent=1, sort_keys=True)
    f.write("\n")
  return digest
