"""Batch inference: embed a prepared entity table with a serving bundle (SPEC §1 "Serving").

Production recomputes every pin and product embedding in a daily offline batch and loads them into
the retrieval index; this is that job. It reads `entities/{pins,products,queries}.parquet` one
record batch at a time (memory is bounded by `batch_size`, never the table), runs the bundle's
tower (no model code: `omnisage.serving.bundle.loader` only) and writes one output shard per
input row
group:

  <out>/<kind>/shard-00000.parquet   entity_index int32, id string (when the table has one),
                                     title string (pins/products: title, queries: the text; what
                                     a search result shows), embedding
                                     fixed_size_list<float32>[embed_dim]

Row group i is embedded by process `i % jax.process_count()`, so hosts split the work without
talking to each other. A shard is written under a temporary name and renamed when complete, so an
existing shard is a finished one: a re-run (after a crash or pre-emption) skips it, unless it was
made by a different bundle or no longer matches its row group's length. The temporary files a
killed run left (`shard-NNNNN.parquet.tmp-PID`) are removed when the next run starts (summary:
"stale_tmp_removed"): each process removes those of the shards it owns (i % process_count) whose
PID is not its own, so the hosts of one job never touch each other's files in progress. One embed
job per output directory at a time: a second one running concurrently would have its files
removed. `config.engine="ray"` (ray_embed.py, docs/scale_out.md) writes the same shards from a Ray
Data actor pool, with `shard_layout`, `is_complete` and `write_shard` below shared by both.

Usage: `summary = embed_entities("runs/demo/bundle", "runs/demo/prepared/entities/pins.parquet",
"runs/demo/embeddings")`.
"""

import contextlib
import dataclasses
import os
import re
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.entity_rows import LOG_FEATURE_COLUMNS
from omnisage.data.omnisearchsage.entity_store import (
  continuous_vectors,
  fixed_vectors,
  pad_list_column,
)
from omnisage.serving.bundle.loader import PARAMS_FILE, load_bundle

KINDS = ("pins", "products", "queries")
# Written into each shard's schema metadata: a shard made by another bundle is not "done".
BUNDLE_KEY = b"omnisage.bundle_params_sha256"
ENGINES = ("local", "ray")   # config.engine: this process, or a Ray Data actor pool (ray_embed.py)
TMP_SHARD = re.compile(r"shard-(\d+)\.parquet\.tmp-(\d+)")   # shard index, writer's PID


def embed_job(config, out_dir: str) -> dict:
  """`launch.py embed` (configs/index.py): every row of `config.entities` through the bundle's
  tower; a two-tower bundle embeds its catalogue (`config.entities` is its items.parquet).
  config.engine="ray" runs the same shards on a Ray Data actor pool (ray_embed.py)."""
  from omnisage.serving.twotower.bundle import embed_items, is_twotower_bundle
  engine = config.get("engine", "local")
  if engine not in ENGINES:
    raise ValueError(f"config.engine must be one of {ENGINES}, got {engine!r}")
  if is_twotower_bundle(config.bundle):
    if engine != "local":
      raise ValueError("config.engine='ray' embeds OmniSearchSage/PinText bundles; a two-tower "
                       "catalogue is embedded with config.engine='local'")
    return embed_items(config.bundle, config.entities, out_dir, batch_size=config.batch_size)
  if engine == "ray":   # imported here: the local job never pays for importing Ray
    from omnisage.serving.index.ray_embed import embed_entities_on_ray
    return embed_entities_on_ray(config.bundle, config.entities, out_dir,
                                 batch_size=config.batch_size,
                                 address=config.get("ray_address"),
                                 workers=config.get("ray_workers", 0),
                                 max_retries=config.get("max_retries", 2))
  return embed_entities(config.bundle, config.entities, out_dir, batch_size=config.batch_size)


def embed_entities(bundle_path: str, entities_parquet: str, out_dir: str, batch_size: int = 1024,
                   kind: str | None = None) -> dict:
  """Embeds every row of `entities_parquet` into `out_dir/<kind>/`; returns a summary.

  kind: "pins", "products" or "queries"; by default the table's file name (pins.parquet, ...).
  """
  t0 = time.time()
  kind = entity_kind(entities_parquet, kind, batch_size)
  bundle = load_bundle(bundle_path)
  source = pq.ParquetFile(entities_parquet)
  layout = shard_layout(bundle, source, kind, entities_parquet)
  kind_dir = os.path.join(out_dir, kind)
  os.makedirs(kind_dir, exist_ok=True)
  stale = remove_stale_tmp(kind_dir)
  mine = [i for i in range(source.num_row_groups)
          if i % jax.process_count() == jax.process_index()]

  written = skipped = embedded = 0
  with tqdm(total=sum(layout.group_rows[i] for i in mine), unit="row", desc=f"embed {kind}",
            disable=jax.process_index() != 0) as bar:
    for i in mine:
      path = shard_path(kind_dir, i)
      if is_complete(path, layout.group_rows[i], layout.bundle_id):
        skipped += 1
        bar.update(layout.group_rows[i])
        continue
      embedded += write_shard(bundle, source, i, layout, path, batch_size, bar.update)
      written += 1
  return job_summary(layout, bundle_path, entities_parquet, kind_dir, mine, written, skipped,
                     embedded, stale, time.time() - t0)


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """What every shard of one (bundle, table) pair looks like: shared by this in-process job and
  the Ray one (ray_embed.py), so the two write the same files."""
  kind: str
  columns: list          # the input columns read
  title_column: str      # the input column that becomes "title"
  out_schema: pa.Schema  # with the bundle's params sha256 in its metadata
  bundle_id: bytes
  group_rows: list       # rows of each input row group
  raw: bool = False      # a raw pins/products table the bundle featurises (raw_entities.py)
  source_path: str = ""  # the input table (named in errors about its rows)

  @property
  def embed_dim(self) -> int:
    return self.out_schema.field("embedding").type.list_size


def entity_kind(entities_parquet: str, kind: str | None, batch_size: int) -> str:
  """The table's kind, after the checks that need neither the bundle nor the table's contents."""
  kind = kind or os.path.splitext(os.path.basename(entities_parquet))[0]
  if kind not in KINDS:
    raise ValueError(f"cannot tell the entity kind of {entities_parquet}: pass kind= one of "
                     f"{KINDS}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not os.path.isfile(entities_parquet):
    raise FileNotFoundError(f"{entities_parquet} not found (a prepared entities/*.parquet table)")
  return kind


def shard_layout(bundle, source: pq.ParquetFile, kind: str, entities_parquet: str) -> ShardLayout:
  """The output layout of `source` embedded by `bundle`; a ValueError names missing columns."""
  names = set(source.schema_arrow.names)
  # A raw pins/products table (schema.RAW_TABLES columns, no prepared `tokens`) is featurised by
  # the bundle itself, exactly as prepare does (raw_entities.py); entity_index is its row number.
  raw = kind != "queries" and "tokens" not in names
  if raw:
    optional = [c for c in ("caption",) + LOG_FEATURE_COLUMNS
                if c in names and c not in schema.RAW_TABLES[kind]]
    needed = list(schema.RAW_TABLES[kind]) + optional
    missing = [c for c in needed if c not in names]
    if missing:
      raise ValueError(f"{entities_parquet}: no column(s) {missing} for a raw {kind} table "
                       f"(schema.RAW_TABLES; or a prepared table with entity_index, tokens, ...)")
    names |= {"entity_index", "id", "title"}   # what the featurised batch has
  else:
    needed = ["entity_index", "tokens"] + ([] if kind == "queries" else ["fields", "legacy",
                                                                          "visual"])
  if kind == "queries" and bundle.query_lexical_len:
    needed.append("lexical")
  missing = [c for c in needed if c not in names]
  if missing:
    raise ValueError(f"{entities_parquet}: no column(s) {missing} for kind {kind!r}")
  # The display text travels with the vectors, so an index needs no second join to show results.
  title_column = "text" if kind == "queries" else "title"
  has_title = title_column in names
  columns = needed if raw else (
      needed + (["id"] if "id" in names else []) + ([title_column] if has_title else []))

  embed_dim = int(bundle.dims["embed_dim"])
  bundle_id = bundle.manifest["files"][PARAMS_FILE]["sha256"].encode()
  out_schema = pa.schema(
      [pa.field("entity_index", pa.int32())]
      + ([pa.field("id", pa.string())] if "id" in names else [])
      + ([pa.field("title", pa.string())] if has_title else [])
      + [pa.field("embedding", pa.list_(pa.float32(), embed_dim))],
      metadata={BUNDLE_KEY: bundle_id})
  group_rows = [source.metadata.row_group(i).num_rows for i in range(source.num_row_groups)]
  return ShardLayout(kind, columns, title_column, out_schema, bundle_id, group_rows, raw,
                     entities_parquet)


def shard_path(kind_dir: str, group: int) -> str:
  return os.path.join(kind_dir, f"shard-{group:05d}.parquet")


def write_shard(bundle, source: pq.ParquetFile, group: int, layout: ShardLayout, path: str,
                batch_size: int, progress=None) -> int:
  """Embeds row group `group` into `path`; returns its rows. Written under `path.tmp-PID` and
  renamed when complete, so the final name only ever holds a complete shard (a killed writer
  leaves a tmp file, never a short shard). progress: called with the rows of each batch."""
  tmp = f"{path}.tmp-{os.getpid()}"
  rows = 0
  first_row = sum(layout.group_rows[:group])
  try:
    with pq.ParquetWriter(tmp, layout.out_schema) as writer:
      for batch in source.iter_batches(batch_size=batch_size, row_groups=[group],
                                       columns=layout.columns):
        if layout.raw:   # featurised here, exactly as prepare does; a bad row is an error
          from omnisage.serving.omnisearchsage.raw_entities import featurize_for_bundle
          batch, _ = featurize_for_bundle(
              bundle, pa.Table.from_batches([batch]), layout.kind,
              f"{layout.source_path} row group {group}", first_row=first_row + rows)
        vectors = _embed_batch(bundle, layout.kind, batch, batch_size)
        writer.write_batch(_output_batch(batch, vectors, layout.out_schema, layout.title_column))
        rows += batch.num_rows
        if progress is not None:
          progress(batch.num_rows)
    os.replace(tmp, path)   # atomic: the final name only ever holds a complete shard
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return rows


def job_summary(layout: ShardLayout, bundle_path: str, entities_parquet: str, kind_dir: str,
                mine: list, written: int, skipped: int, embedded: int, stale: int,
                seconds: float) -> dict:
  """The JSON summary of an embed job (the same keys whichever engine ran it)."""
  return {"kind": layout.kind, "bundle": bundle_path, "entities": entities_parquet,
          "out": kind_dir, "embed_dim": layout.embed_dim,
          "rows": sum(layout.group_rows[i] for i in mine), "rows_embedded": embedded,
          "shards": len(layout.group_rows), "shards_this_process": len(mine),
          "shards_written": written, "shards_skipped": skipped, "stale_tmp_removed": stale,
          "seconds": round(seconds, 2),
          "rows_per_second": round(embedded / seconds, 1) if seconds > 0 else 0.0}


def remove_stale_tmp(kind_dir: str, process: tuple[int, int] | None = None) -> int:
  """Removes the temporary shards a killed run left in kind_dir; returns how many. Only those of
  the shards this process owns (shard i belongs to process i % process_count) and written by
  another PID: a file of this process is in progress, another host's is its business.
  process: (index, count) when the owner is not a JAX process (the Ray driver owns every shard:
  (0, 1)); by default JAX's."""
  index, count = process or (jax.process_index(), jax.process_count())
  removed = 0
  for name in sorted(os.listdir(kind_dir)):
    match = TMP_SHARD.fullmatch(name)
    if match and int(match[1]) % count == index and int(match[2]) != os.getpid():
      with contextlib.suppress(FileNotFoundError):   # gone already: nothing to do
        os.remove(os.path.join(kind_dir, name))
        removed += 1
  return removed


def is_complete(path: str, rows: int, bundle_id: bytes) -> bool:
  """True when `path` is a readable shard of `rows` rows made by this bundle."""
  if not os.path.exists(path):
    return False
  try:
    meta = pq.read_metadata(path)
    made_by = pq.read_schema(path).metadata or {}
  except (OSError, pa.ArrowException):   # unreadable: recompute rather than trust it
    return False
  return meta.num_rows == rows and made_by.get(BUNDLE_KEY) == bundle_id


def _embed_batch(bundle, kind: str, batch: pa.RecordBatch, batch_size: int) -> np.ndarray:
  """The tower inputs of one record batch, laid out exactly as EntityStore does for training."""
  n = batch.num_rows
  # The bundle compiles once per batch shape: pad to a power of two (capped at batch_size) so a
  # run sees at most log2(batch_size) shapes, however its row groups happen to be cut.
  padded = min(batch_size, 1 << max(n - 1, 0).bit_length())

  def pad(x):
    return np.pad(x, ((0, padded - n),) + ((0, 0),) * (x.ndim - 1))

  if kind == "queries":
    tokens = pad_list_column(batch.column("tokens"), bundle.dims["query_len"], np.int32)
    if bundle.query_lexical_len:   # the lexical path's n-gram ids follow (query_input.py)
      tokens = np.concatenate([tokens, pad_list_column(batch.column("lexical"),
                                                       bundle.query_lexical_len, np.int32)], 1)
    return bundle.embed_queries(pad(tokens))[:n]
  width = bundle.dims["entity_tokens"]
  tokens = pad_list_column(batch.column("tokens"), width, np.int32)
  fields = pad_list_column(batch.column("fields"), width, np.int32)
  legacy, _ = fixed_vectors(pa.chunked_array([batch.column("legacy")]), schema.LEGACY_DIM)
  visual, _ = fixed_vectors(pa.chunked_array([batch.column("visual")]), schema.VISUAL_DIM)
  # EntityStore keeps visual features as float16; round the same way so serving sees the inputs
  # training saw.
  visual = visual.astype(np.float16).astype(np.float32)
  continuous = continuous_vectors(kind, legacy, visual)
  return bundle.embed_entities(pad(tokens), pad(fields), pad(continuous))[:n]


def embed_record_batch(bundle, kind: str, batch: pa.RecordBatch, batch_size: int) -> np.ndarray:
  """[n, embed_dim] of a record batch laid out as a prepared entities table."""
  return _embed_batch(bundle, kind, batch, batch_size)


def _output_batch(batch: pa.RecordBatch, vectors: np.ndarray, out_schema: pa.Schema,
                  title_column: str):
  dim = vectors.shape[1]
  arrays = [batch.column("entity_index").cast(pa.int32())]
  if "id" in out_schema.names:
    arrays.append(batch.column("id").cast(pa.string()))
  if "title" in out_schema.names:
    arrays.append(batch.column(title_column).cast(pa.string()))
  flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
  arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
  return pa.RecordBatch.from_arrays(arrays, schema=out_schema)
