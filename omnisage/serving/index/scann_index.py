"""Retrieval index: one auto-tuned ScaNN searcher per entity kind (SPEC §1 "Serving").

Production serves pins and products from an approximate-nearest-neighbour index over the daily
batch embeddings; here each kind directory written by `launch.py embed`
(`<embeddings>/<kind>/shard-*.parquet`: entity_index, id, title, embedding) becomes

  <out>/<kind>/scann/          the serialized ScaNN searcher (relative asset paths; no pickle)
  <out>/<kind>/items.parquet   row -> entity_index, id, title (what a search result shows)
  <out>/<kind>/index.json      format, size, dim, metric, the tuned parameters, the Recall@10 and
                               QPS measured on held-out queries, the source embeddings (bundle id
                               and shard sha256s), the sha256 of items.parquet, and "files": the
                               sha256 and size of every file of the kind directory (ScaNN's
                               assets included: serialized_partitioner.pb, dataset.npy, ...)

Tree size, leaves searched and reorder size are tuned (`omnisage.serving.index.ann.autotune`) for a
target Recall@10 against exact search, on the real query embeddings (`<embeddings>/queries`) when
they exist, else on noisy copies of database rows. A kind is written to a temporary directory and
renamed into place, so a reader never sees half an index. `load_index` re-checks the hashes (of
every file, before ScaNN reads any: ScaNN's own parsers are not hardened against damaged input)
and shapes and refuses a damaged, mismatched or unlisted file with `IndexError_` naming it; an
index.json written before the "files" checksums existed is refused with "rebuild with launch.py
index".

Usage: `summary = build_index("runs/demo/embeddings", "runs/demo/index")`;
`indexes = load_index("runs/demo/index"); scores, rows = indexes["pins"].search(q, k=10)`.
"""

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.serving.bundle.loader import sha256_of
from omnisage.serving.index import ann
from omnisage.serving.index.embed import BUNDLE_KEY

log = logging.getLogger("omnisage")

FORMAT_VERSION = 1
# "items": the home-feed two-tower's item embeddings (SPEC §3, serving/twotower_bundle.py). New
# kinds go at the end: a kind's position seeds its tuning sample.
KINDS = ("pins", "products", "queries", "items")
DEFAULT_FUSION = {"method": "weighted", "weight": 0.5, "tuned": False}
MODES = ("dense", "lexical", "hybrid")
HYBRID_DEPTH = 100   # candidates each list contributes to a hybrid search
METRIC = "dot_product"
TUNE_QUERIES = 1000   # per split (choose / held-out)


class IndexError_(ValueError):
  """A missing, damaged or mismatched index directory (the message names the file)."""


@dataclass
class Embeddings:
  """One kind's vectors and display columns, row-aligned."""
  vectors: np.ndarray          # float32 [N, D]
  entity_index: np.ndarray     # int64 [N]
  ids: list[str]
  titles: list[str]
  source: dict = field(default_factory=dict)


def read_embeddings(kind_dir: str) -> Embeddings:
  """All `kind_dir/shard-*.parquet` in sorted order; ValueError naming the file on bad input."""
  paths = sorted(glob.glob(os.path.join(kind_dir, "shard-*.parquet")))
  if not paths:
    raise ValueError(f"{kind_dir}: no shard-*.parquet embedding shards (launch.py embed)")
  vectors, entity, ids, titles, shards, bundles = [], [], [], [], [], set()
  dim = None
  for path in paths:
    try:
      table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
      raise ValueError(f"{path}: not a readable parquet file ({error})") from error
    names = table.schema.names
    missing = [c for c in ("entity_index", "embedding") if c not in names]
    if missing or ("id" not in names and "title" not in names):
      need = missing or ["id or title"]
      raise ValueError(f"{path}: no column(s) {need} (have {names})")
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
      raise ValueError(f"{path}: column 'embedding' must be fixed_size_list<float32>, got "
                       f"{column.type}")
    width = column.type.list_size
    if dim is not None and width != dim:
      raise ValueError(f"{path}: embedding dim {width} disagrees with {paths[0]} ({dim})")
    dim = width
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if column.null_count or len(flat) != len(table) * width:
      raise ValueError(f"{path}: null embeddings")
    block = flat.reshape(len(table), width)
    if not np.isfinite(block).all():
      bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
      raise ValueError(f"{path}: embedding of row {bad} contains NaN or infinity")
    vectors.append(block)
    entity.append(table.column("entity_index").to_numpy().astype(np.int64))
    title = table.column("title").to_pylist() if "title" in names else None
    ident = table.column("id").to_pylist() if "id" in names else title
    ids += [str(x) for x in ident]
    titles += [str(x) if x is not None else "" for x in (title or ident)]
    bundles.add((table.schema.metadata or {}).get(BUNDLE_KEY, b"").decode())
    shards.append({"file": os.path.basename(path), "rows": len(table), "sha256": sha256_of(path)})
  bundle = sorted(bundles)[0] if len(bundles) == 1 else None
  return Embeddings(np.concatenate(vectors), np.concatenate(entity), ids, titles,
                    {"bundle_params_sha256": bundle or None, "shards": shards})


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tuning_queries(vectors: np.ndarray, query_vectors: np.ndarray | None, rng,
                   per_split: int = TUNE_QUERIES) -> tuple[np.ndarray, np.ndarray, str]:
  """(choose split, held-out split, source): disjoint samples of the query distribution."""
  if query_vectors is not None and len(query_vectors) >= 2:
    pick = rng.permutation(len(query_vectors))[:2 * per_split]
    sample, source = query_vectors[pick], "queries"
  else:
    # No real queries: database rows moved by a little noise (~0.1 of their norm), so a query
    # is near but never equal to its source row.
    pick = rng.choice(len(vectors), size=min(2 * per_split, 2 * len(vectors)),
                      replace=len(vectors) < 2 * per_split)
    base = vectors[pick]
    noise = rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    sample = _normalise(base + 0.1 * np.linalg.norm(base, axis=1, keepdims=True) * noise)
    source = "database_rows_with_noise"
  half = len(sample) // 2
  return sample[:half].astype(np.float32), sample[half:].astype(np.float32), source


def build_index(embeddings_dir: str, out_dir: str, target_recall: float = 0.95, k: int = 10,
                seed: int = 0, kinds: tuple[str, ...] | None = None,
                tune_queries_per_split: int = TUNE_QUERIES, qps_seconds: float = 0.3,
                threads: int | None = None, lexical: bool = True) -> dict:
  """Builds out_dir/<kind>/ for every kind directory in embeddings_dir; returns a summary.

  lexical: also a BM25 index over each kind's titles (hybrid.py fuses the two at search time)."""
  if not os.path.isdir(embeddings_dir):
    raise FileNotFoundError(f"{embeddings_dir}: embeddings directory not found (launch.py embed)")
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
  present = [kind for kind in KINDS if os.path.isdir(os.path.join(embeddings_dir, kind))]
  kinds = present if kinds is None else [kind for kind in kinds if kind in present]
  if not kinds:
    raise ValueError(f"{embeddings_dir}: no kind directory ({', '.join(KINDS)}) to index")
  query_vectors = None
  if "queries" in present:
    query_vectors = read_embeddings(os.path.join(embeddings_dir, "queries")).vectors
  os.makedirs(out_dir, exist_ok=True)
  summary = {}
  for kind in kinds:
    t0 = time.time()
    data = read_embeddings(os.path.join(embeddings_dir, kind))
    if query_vectors is not None and query_vectors.shape[1] != data.vectors.shape[1]:
      raise ValueError(f"{embeddings_dir}/queries: dim {query_vectors.shape[1]} disagrees with "
                       f"{kind} ({data.vectors.shape[1]})")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    tune, holdout, source = tuning_queries(data.vectors, query_vectors, rng,
                                           tune_queries_per_split)
    result = ann.autotune(data.vectors, tune, holdout, target_recall=target_recall, k=k,
                          threads=threads, qps_seconds=qps_seconds)
    info = write_kind_index(out_dir, kind, data, result, target_recall, k, source, lexical)
    seconds = round(time.time() - t0, 2)
    summary[kind] = {"size": info["size"], "dim": info["dim"], "params": info["params"],
                     "recall@10": info["holdout"]["recall"], "qps": info["holdout"]["qps"],
                     "exact_qps": info["holdout"]["exact_qps"],
                     "tune_recall@10": info["tune"]["recall"], "met_target": info["met_target"],
                     "lexical": "lexical" in info, "build_seconds": seconds}
    log.info("index %s: %d rows, %s, recall@10 %.4f at %.0f qps (exact %.0f) in %.1fs", kind,
             info["size"], info["params"], info["holdout"]["recall"], info["holdout"]["qps"],
             info["holdout"]["exact_qps"], seconds)
  return {"out": out_dir, "target_recall": target_recall, "kinds": summary}


def write_kind_index(out_dir: str, kind: str, data: Embeddings, result: dict,
                     target_recall: float, k: int, source: str, lexical: bool = False) -> dict:
  """Writes out_dir/<kind>/ from an `ann.autotune` result: in a temporary directory, then swapped
  in. Returns the index.json contents."""
  final = os.path.join(out_dir, kind)
  tmp = os.path.join(out_dir, f".{kind}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "scann"))
  try:
    # Relative asset paths: the directory is renamed below and may be copied elsewhere.
    result["searcher"].serialize(os.path.join(tmp, "scann"), relative_path=True)
    items_path = os.path.join(tmp, "items.parquet")
    pq.write_table(pa.table({"entity_index": pa.array(data.entity_index, pa.int64()),
                             "id": pa.array(data.ids, pa.string()),
                             "title": pa.array(data.titles, pa.string())}), items_path)
    lexical_info = _write_lexical(tmp, data.titles) if lexical else None
    rounded = {"recall": round(result["holdout"]["recall"], 4)}
    info = {"format_version": FORMAT_VERSION, "kind": kind, "size": len(data.vectors),
            "dim": int(data.vectors.shape[1]), "metric": METRIC, "k": k,
            "params": result["params"], "target_recall": target_recall,
            "met_target": bool(result["met_target"]), "threads": result["threads"],
            "tune_queries": source,
            "tune": {**result["tune"], "recall": round(result["tune"]["recall"], 4),
                     "qps": round(result["tune"]["qps"], 1)},
            "holdout": {**result["holdout"], **rounded,
                        "qps": round(result["holdout"]["qps"], 1),
                        "exact_qps": round(result["holdout"]["exact_qps"], 1)},
            "source": data.source,
            "items_sha256": sha256_of(items_path),
            "files": _file_checksums(tmp)}
    if lexical_info is not None:
      info["lexical"] = lexical_info
    with open(os.path.join(tmp, "index.json"), "w") as f:
      json.dump(info, f, indent=2)
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
      os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return info


def _write_lexical(kind_dir: str, titles: list[str]) -> dict | None:
  """A BM25 index (bm25s files) of the rows' titles in kind_dir/bm25/, and its index.json entry:
  the default fusion until `set_fusion` stores a tuned one. None (with a warning) when bm25s is
  not installed: the index is then dense only."""
  try:
    from omnisage.baselines.bm25 import BM25Index
    index = BM25Index([t or "" for t in titles])
  except ImportError as error:
    log.warning("no lexical index (%s): install the index extra for hybrid search", error)
    return None
  index.save(os.path.join(kind_dir, "bm25"))
  return {"engine": "bm25s", "language": index.language, "field": "title",
          "fusion": dict(DEFAULT_FUSION)}


def set_fusion(kind_dir: str, method: str, weight: float, tuned_on: dict | None = None) -> dict:
  """Stores the fusion of a kind's hybrid search in its index.json (e.g. the weight tuned on
  validation queries by hybrid.tune_weight); returns the entry."""
  from omnisage.serving.index import hybrid
  if method not in hybrid.METHODS or not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion: method one of {hybrid.METHODS} and weight in [0, 1], got "
                     f"{method!r}, {weight}")
  path = os.path.join(kind_dir, "index.json")
  with open(path) as f:
    info = json.load(f)
  if "lexical" not in info:
    raise IndexError_(f"{path}: no lexical index to fuse with (built without bm25s)")
  info["lexical"]["fusion"] = {"method": method, "weight": float(weight),
                               "tuned": tuned_on is not None, **({"tuned_on": tuned_on}
                                                                 if tuned_on else {})}
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, path)
  return info["lexical"]["fusion"]


def _files_under(kind_dir: str) -> list[str]:
  """Every file under kind_dir but index.json, relative to it, sorted."""
  found = (os.path.relpath(os.path.join(root, name), kind_dir)
           for root, _, names in os.walk(kind_dir) for name in names)
  return sorted(rel for rel in found if rel != "index.json")


def _file_checksums(kind_dir: str) -> dict:
  """{path relative to kind_dir: {sha256, bytes}} of every file under it (index.json aside)."""
  return {rel: {"sha256": sha256_of(os.path.join(kind_dir, rel)),
                "bytes": os.path.getsize(os.path.join(kind_dir, rel))}
          for rel in _files_under(kind_dir)}


def _verify_files(kind_dir: str, info: dict, info_path: str):
  """Every file of the kind directory against index.json's "files", before anything parses it:
  a missing, changed or unlisted file (or a listed name outside the directory) is refused."""
  files = info["files"]
  if not isinstance(files, dict) or not all(
      isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
      for v in files.values()):
    raise IndexError_(f"{info_path}: field 'files' must map file names to {{sha256, bytes}}")
  root = os.path.realpath(kind_dir)
  for name, want in files.items():
    full = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or not full.startswith(root + os.sep):
      raise IndexError_(f"{info_path}: file {name!r} lies outside {kind_dir}")
    if not os.path.isfile(full):
      raise IndexError_(f"{os.path.join(kind_dir, name)}: listed in {info_path} but missing: "
                        "rebuild with launch.py index")
    if os.path.getsize(full) != want["bytes"] or sha256_of(full) != want["sha256"]:
      raise IndexError_(f"{os.path.join(kind_dir, name)}: sha256 differs from {info_path} "
                        "(damaged or changed after the index was built): rebuild with launch.py "
                        "index")
  # ScaNN reads whatever scann_assets.pbtxt names: nothing unlisted may sit next to it.
  unlisted = [rel for rel in _files_under(kind_dir) if rel not in files]
  if unlisted:
    raise IndexError_(f"{os.path.join(kind_dir, unlisted[0])}: not listed in {info_path} (not "
                      "written by launch.py index), refusing to load")


class KindIndex:
  """A loaded searcher for one kind and the display columns of its rows."""

  def __init__(self, kind: str, searcher, info: dict, items: pa.Table, path: str,
               threads: int = 1, lexical=None):
    self.kind = kind
    self.searcher = searcher
    self.info = info
    self.dim = int(info["dim"])
    self.size = int(info["size"])
    self.entity_index = items.column("entity_index").to_numpy()
    self.ids = items.column("id").to_pylist()
    self.titles = items.column("title").to_pylist()
    self.threads = threads
    self.path = path
    self._vectors = None   # the float32 rows, read lazily for the (rare) exact fallback
    self.lexical = lexical   # a BM25Index over the titles, or None (dense only)
    self.fusion = dict(info.get("lexical", {}).get("fusion", DEFAULT_FUSION))

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [B, k'], rows int64 [B, k']), inner product, best first; k' = min(k, size).
    """
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"{self.kind} index: queries must be [B, {self.dim}], got shape "
                       f"{queries.shape}")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, self.size)
    params = self.info["params"]
    scores, rows = ann.scann_search(self.searcher, queries, k, params.get("leaves_to_search"),
                                    params.get("reorder"), self.threads)
    missing = np.isnan(scores).any(axis=1)
    if missing.any():
      # Fewer than k rows in the leaves searched: score those queries exactly instead.
      exact_s, exact_r = self._exact(queries[missing], k)
      scores[missing], rows[missing] = exact_s, exact_r
    return scores, rows

  def lexical_search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """BM25 over the titles: (scores float32 [B, k'], rows int64 [B, k']), best first."""
    if self.lexical is None:
      raise ValueError(f"{self.kind} index has no lexical (BM25) index: rebuild it with "
                       "launch.py index and bm25s installed")
    scores, rows = self.lexical.search(list(texts), k)
    return scores.astype(np.float32), rows.astype(np.int64)

  def hybrid_search(self, queries: np.ndarray, texts: list[str], k: int, method: str | None = None,
                    weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense and BM25 top HYBRID_DEPTH (at least k) fused by `method` and `weight` (default: the
    index's stored fusion, hybrid.py); rows -1 where fewer than k candidates exist."""
    from omnisage.serving.index import hybrid
    depth = max(k, HYBRID_DEPTH)
    lexical = self.lexical_search(texts, depth)
    dense = self.search(queries, depth)
    return hybrid.fuse(dense, lexical, min(k, self.size), method or self.fusion["method"],
                       self.fusion["weight"] if weight is None else weight)

  def _exact(self, queries, k):
    if self._vectors is None:
      self._vectors = np.load(os.path.join(self.path, "scann", "dataset.npy"), mmap_mode="r")
    all_scores = queries @ np.asarray(self._vectors).T
    rows = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, rows, axis=1).astype(np.float32), rows.astype(np.int64)


def load_index(out_dir: str, threads: int | None = None) -> dict[str, KindIndex]:
  """kind -> KindIndex for every out_dir/<kind>/index.json; IndexError_ on anything amiss."""
  if not os.path.isdir(out_dir):
    raise IndexError_(f"{out_dir}: index directory not found (launch.py index)")
  kinds = [kind for kind in KINDS if os.path.isfile(os.path.join(out_dir, kind, "index.json"))]
  if not kinds:
    raise IndexError_(f"{out_dir}: no <kind>/index.json (launch.py index)")
  threads = threads or os.cpu_count() or 1
  return {kind: _load_kind(os.path.join(out_dir, kind), kind, threads) for kind in kinds}


def _load_kind(kind_dir: str, kind: str, threads: int) -> KindIndex:
  info_path = os.path.join(kind_dir, "index.json")
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise IndexError_(f"{info_path}: unreadable ({error})") from error
  if not isinstance(info, dict):
    raise IndexError_(f"{info_path}: not a JSON object")
  if info.get("format_version") != FORMAT_VERSION:
    raise IndexError_(f"{info_path}: format_version {info.get('format_version')!r} is not "
                      f"{FORMAT_VERSION}: rebuild with launch.py index")
  for key in ("size", "dim", "params", "items_sha256", "metric"):
    if key not in info:
      raise IndexError_(f"{info_path}: no field {key!r}")
  if "files" not in info:
    raise IndexError_(f"{info_path}: no 'files' checksums (an index built by an earlier "
                      "omnisage): rebuild with launch.py index")
  if info["metric"] != METRIC:
    raise IndexError_(f"{info_path}: metric {info['metric']!r} is not {METRIC!r}")
  items_path = os.path.join(kind_dir, "items.parquet")
  if not os.path.isfile(items_path):
    raise IndexError_(f"{items_path}: missing")
  if sha256_of(items_path) != info["items_sha256"]:
    raise IndexError_(f"{items_path}: sha256 differs from {info_path} (items changed after the "
                      "index was built): rebuild with launch.py index")
  items = pq.read_table(items_path)
  if len(items) != info["size"]:
    raise IndexError_(f"{items_path}: {len(items)} rows, {info_path} says {info['size']}")
  scann_dir = os.path.join(kind_dir, "scann")
  dataset = os.path.join(scann_dir, "dataset.npy")
  if not os.path.isfile(os.path.join(scann_dir, "scann_assets.pbtxt")) or \
      not os.path.isfile(dataset):
    raise IndexError_(f"{scann_dir}: no serialized ScaNN searcher (scann_assets.pbtxt, "
                      "dataset.npy)")
  if os.path.exists(os.path.join(scann_dir, "scann_docids.pkl")):
    # ScaNN would unpickle this file; we never write one, so it is not ours.
    raise IndexError_(f"{scann_dir}/scann_docids.pkl: unexpected pickle file, refusing to load")
  _verify_files(kind_dir, info, info_path)
  shape = np.load(dataset, mmap_mode="r").shape   # reads the header only
  if shape != (info["size"], info["dim"]):
    raise IndexError_(f"{dataset}: vectors have shape {shape}, {info_path} says size "
                      f"{info['size']} x dim {info['dim']}")
  searcher = ann.import_scann().load_searcher(scann_dir, assets_backcompat_shim=False)
  searcher.set_num_threads(threads)
  lexical = None
  if "lexical" in info:
    from omnisage.baselines.bm25 import BM25Index
    try:
      lexical = BM25Index.load(os.path.join(kind_dir, "bm25"), info["size"],
                               info["lexical"].get("language", "english"))
    except (OSError, ValueError, KeyError) as error:
      raise IndexError_(f"{kind_dir}/bm25: unreadable lexical index ({error})") from error
  return KindIndex(kind, searcher, info, items, kind_dir, threads, lexical)
