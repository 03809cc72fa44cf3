"""The two-tower serving bundle (SPEC §3 "Serving"): write, verify, load; offline item embeddings.

Items are embedded offline in batch (`launch.py embed` -> `embed_items`) and indexed with ScaNN;
the user vector is computed online per request from the exported user tower. Like the
OmniSearchSage bundle (serving/export.py, serving/bundle.py), each tower is a `jax.export` program
(CPU and CUDA, symbolic batch) taking its weights as a flat params dict, so serving needs no model
code.

Layout (`<out>/`):
  manifest.json         format_version, system "twotower", step, dims, feature settings, each
                        tower's param keys/shapes/dtypes, sha256 of every file
  user_tower.jaxexport  fn(params, hist_items[b, H] int32, hist_age[b, H] f32 (days),
                           hist_genres[b, H, G] f32, user_dense[b, 3] f32) -> [b, 64]
  item_tower.jaxexport  fn(params, item[b] int32, item_genres[b, G] f32, item_year[b] int32,
                           item_dense[b, 2] f32, item_title[b, T] int32) -> [b, 64]
  params.safetensors    "<tower>/<key>" -> array (params and the hash-index constants)
  items.parquet         the item catalogue the towers read (omnisage/data/twotower/examples.py)
  meta.json             the prepared data's meta (cut, genre names, ...)

Embeddings (`embed_items`): <out>/items/shard-00000.parquet with the schema of
omnisage/serving/index/embed.py (entity_index int32 = catalogue index, id string = movieId, title
string, embedding fixed_size_list<float32>[64]; the bundle's params sha256 in the schema metadata).

Usage:
  bundle = load_twotower_bundle("runs/twotower/bundle")
  u = bundle.embed_users(**bundle.catalogue.user_inputs(hist_items, hist_age, user_dense))
  embed_items("runs/twotower/bundle", "runs/twotower/bundle/items.parquet", "runs/tt/embeddings")
"""

import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage.data.twotower import examples as mlx
from omnisage.serving.bundle.loader import (
  NUMBER,
  STR,
  STR_LIST,
  BundleError,
  ExportedTowers,
  check_manifest,
  load_function,
  load_safetensors,
  read_manifest,
  verify_files,
)
from omnisage.serving.index.embed import BUNDLE_KEY, remove_stale_tmp

FORMAT_VERSION = 1
SYSTEM = "twotower"
MANIFEST, PARAMS_FILE = "manifest.json", "params.safetensors"
TOWERS = {"user_tower": ("hist_items", "hist_age", "hist_genres", "user_dense"),
          "item_tower": ("item", "item_genres", "item_year", "item_dense", "item_title")}
KIND = "items"   # the embeddings / index kind
DIMS = ("embed_dim", "history_len", "num_genres", "user_dense_dim", "item_dense_dim",
        "title_tokens", "num_items")
# The manifest's "features" section (loader.check_manifest: optional, typed when present).
FEATURES = {"cut": NUMBER, "genres": STR_LIST, "popularity_window_days": NUMBER,
            "time_unit_of_ages": STR}


def is_twotower_bundle(path: str) -> bool:
  """True when `path`'s manifest says system "twotower" (launch.py embed/serve dispatch)."""
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f).get("system") == SYSTEM
  except (OSError, ValueError, RecursionError, AttributeError):   # not ours: load_bundle says why
    return False


def export(config, workdir: str, out_dir: str) -> dict:
  """`launch.py export` of the two-tower system: the bundle of the newest checkpoint."""
  from omnisage.train.loop import restore_for_eval
  from omnisage.train.twotower.trainer import setup
  if jax.process_count() > 1:
    raise ValueError("export runs in a single process: drop the multi-host flags")
  run, state, statics, _ = setup(config, workdir)
  step, trained = restore_for_eval(config, workdir, state)
  return write_bundle(statics.model(trained.params), run.meta, run.prepared, int(step), out_dir,
                      config=json.loads(config.to_json()))


def write_bundle(model, meta: dict, prepared_dir: str, step: int, out_dir: str,
                 config: dict) -> dict:
  # export-time only (model code)
  from omnisage.serving.bundle.writer import PLATFORMS, publish_bundle, start_bundle, write_towers
  dims = {"embed_dim": int(config["model"]["embed_dim"]), "history_len": meta["history_len"],
          "num_genres": len(meta["genres"]), "user_dense_dim": meta["user_dense_dim"],
          "item_dense_dim": meta["item_dense_dim"], "title_tokens": meta["title_tokens"],
          "num_items": meta["num_items"]}
  b = jax.export.symbolic_shape("b")[0]
  h, g = dims["history_len"], dims["num_genres"]
  spec = jax.ShapeDtypeStruct
  inputs = {"user_tower": (spec((b, h), np.int32), spec((b, h), np.float32),
                           spec((b, h, g), np.float32), spec((b, dims["user_dense_dim"]),
                                                             np.float32)),
            "item_tower": (spec((b,), np.int32), spec((b, g), np.float32), spec((b,), np.int32),
                           spec((b, dims["item_dense_dim"]), np.float32),
                           spec((b, dims["title_tokens"]), np.int32))}
  tmp = start_bundle(out_dir)
  trees = write_towers(tmp, model, inputs)
  shutil.copy(os.path.join(prepared_dir, mlx.ITEMS), tmp)
  shutil.copy(os.path.join(prepared_dir, mlx.META), tmp)
  manifest = {"format_version": FORMAT_VERSION, "system": SYSTEM, "step": step,
              "jax_version": jax.__version__, "platforms": list(PLATFORMS), "dims": dims,
              "features": {"cut": meta["cut"], "genres": meta["genres"],
                           "popularity_window_days": meta["popularity_window_days"],
                           "time_unit_of_ages": "days"},
              "towers": {name: {"function": f"{name}.jaxexport", "params": trees[name]}
                         for name in TOWERS}}
  files = publish_bundle(tmp, out_dir, manifest)
  return {"bundle": os.path.abspath(out_dir), "step": step, "dims": dims,
          "files": {name: info["bytes"] for name, info in files.items()}}


@dataclasses.dataclass
class TwoTowerBundle(ExportedTowers):
  """User and item towers plus the item catalogue their inputs are built from."""
  catalogue: mlx.Catalogue

  def embed_users(self, hist_items, hist_age, hist_genres, user_dense) -> np.ndarray:
    return self._run("user_tower", np.asarray(hist_items, np.int32),
                     np.asarray(hist_age, np.float32), np.asarray(hist_genres, np.float32),
                     np.asarray(user_dense, np.float32))

  def embed_items(self, item, item_genres, item_year, item_dense, item_title) -> np.ndarray:
    return self._run("item_tower", np.asarray(item, np.int32),
                     np.asarray(item_genres, np.float32), np.asarray(item_year, np.int32),
                     np.asarray(item_dense, np.float32), np.asarray(item_title, np.int32))


def load_twotower_bundle(path: str) -> TwoTowerBundle:
  """Verifies (format, system, the manifest's shape, files confined to the bundle and their
  sha256, params against the programs) and loads."""
  manifest = read_manifest(path)
  if manifest.get("system") != SYSTEM or manifest.get("format_version") != FORMAT_VERSION:
    raise BundleError(f"{os.path.join(path, MANIFEST)}: not a two-tower bundle of format_version "
                      f"{FORMAT_VERSION} (system {manifest.get('system')!r}, format_version "
                      f"{manifest.get('format_version')!r})")
  check_manifest(manifest, tuple(TOWERS), DIMS, {"features": FEATURES})
  verify_files(path, manifest, (PARAMS_FILE, mlx.ITEMS, *(f"{t}.jaxexport" for t in TOWERS)))
  flat = load_safetensors(path)
  params, functions = {}, {}
  for name in TOWERS:
    entries = manifest["towers"][name]["params"]
    missing = [e["key"] for e in entries if f"{name}/{e['key']}" not in flat]
    if missing:
      raise BundleError(f"{PARAMS_FILE}: no tensor(s) {missing} of {name}")
    params[name] = {e["key"]: flat[f"{name}/{e['key']}"] for e in entries}
    functions[name] = load_function(path, manifest, name)
    (taken, *_), _ = jax.tree.unflatten(functions[name].in_tree, functions[name].in_avals)
    if set(taken) != set(params[name]):
      raise BundleError(f"{name}.jaxexport takes params {sorted(taken)}, {PARAMS_FILE} has "
                        f"{sorted(params[name])}")
    out_dim = functions[name].out_avals[0].shape[-1]
    if out_dim != manifest["dims"]["embed_dim"]:
      raise BundleError(f"{MANIFEST}: dims.embed_dim = {manifest['dims']['embed_dim']} but "
                        f"{name}.jaxexport returns {out_dim}")
  dims = manifest["dims"]
  catalogue = mlx.Catalogue.from_file(os.path.join(path, mlx.ITEMS), dims["num_genres"],
                                      dims["title_tokens"])
  return TwoTowerBundle(path, manifest, params, functions, catalogue)

def embed_items(bundle_path: str, items_parquet: str, out_dir: str, batch_size: int = 1024
                ) -> dict:
  """Embeds every catalogue item of `items_parquet` into out_dir/items/shard-00000.parquet."""
  t0 = time.time()
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  bundle = load_twotower_bundle(bundle_path)
  dims = bundle.dims
  catalogue = mlx.Catalogue.from_file(items_parquet, dims["num_genres"], dims["title_tokens"])
  if catalogue.size > dims["num_items"]:
    raise ValueError(f"{items_parquet}: {catalogue.size} items, but the bundle's id tables "
                     f"cover {dims['num_items']}")
  rows = np.arange(1, catalogue.size + 1)
  vectors = []
  for start in range(0, len(rows), batch_size):
    idx = rows[start:start + batch_size]
    # Pad to a power of two (capped at batch_size): at most log2(batch_size) compiled shapes.
    padded = min(batch_size, 1 << max(len(idx) - 1, 0).bit_length())
    block = np.pad(idx, (0, padded - len(idx)))
    inputs = catalogue.item_inputs(block)
    vectors.append(bundle.embed_items(*(inputs[k] for k in TOWERS["item_tower"]))[:len(idx)])
  vectors = np.concatenate(vectors)
  bundle_id = bundle.manifest["files"][PARAMS_FILE]["sha256"].encode()
  dim = int(dims["embed_dim"])
  schema = pa.schema([pa.field("entity_index", pa.int32()), pa.field("id", pa.string()),
                      pa.field("title", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim))],
                     metadata={BUNDLE_KEY: bundle_id})
  table = pa.table([pa.array(rows.astype(np.int32)), pa.array(catalogue.ids[1:], pa.string()),
                    pa.array(catalogue.titles[1:], pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)],
                   schema=schema)
  kind_dir = os.path.join(out_dir, KIND)
  os.makedirs(kind_dir, exist_ok=True)
  stale = remove_stale_tmp(kind_dir)   # a killed run's shard-00000.parquet.tmp-PID
  path = os.path.join(kind_dir, "shard-00000.parquet")
  tmp = f"{path}.tmp-{os.getpid()}"
  pq.write_table(table, tmp)
  os.replace(tmp, path)   # atomic: the final name only ever holds a complete shard
  seconds = time.time() - t0
  return {"kind": KIND, "bundle": bundle_path, "entities": items_parquet, "out": kind_dir,
          "embed_dim": dim, "rows": len(rows), "stale_tmp_removed": stale,
          "seconds": round(seconds, 2),
          "rows_per_second": round(len(rows) / max(seconds, 1e-9), 1)}
