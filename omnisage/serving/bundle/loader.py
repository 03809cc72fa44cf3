"""Load a serving bundle written by `launch.py export` and embed with it (SPEC §1 "Serving").

This is what a model server (online query embeddings) or a batch job (daily pin/product
embeddings) imports. It needs NO model code: only JAX, NumPy, safetensors and the standard
library. The towers are `jax.export` programs, so a server runs exactly the computation that was
trained, whatever the omnisage source tree looks like at serving time.

Before anything runs, `load_bundle` refuses (BundleError) a bundle whose files do not match their
sha256 in the manifest, whose format_version this loader does not read, or whose manifest dims
disagree with the shapes of the exported programs and weights: a bundle is either exactly what
was exported or not served at all.

Usage:
  bundle = load_bundle("runs/demo/bundle")
  q = bundle.embed_queries(query_tokens)                       # [B, embed_dim] float32
  p = bundle.embed_entities(tokens, fields, continuous)        # [B, embed_dim] float32
"""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import safetensors.numpy

FORMAT_VERSION = 1   # the one format_version this loader reads
MANIFEST = "manifest.json"
PARAMS_FILE = "params.safetensors"
TOWERS = ("query_tower", "entity_tower")


class BundleError(ValueError):
  """The bundle is damaged, of an unsupported format, or inconsistent with itself (a ValueError:
  a user's input, reported by launch.py without a traceback)."""


@dataclasses.dataclass
class ExportedTowers:
  """A verified bundle's exported tower programs and their weights (shared by every bundle kind:
  this one and serving/twotower_bundle.py)."""
  path: str
  manifest: dict
  params: dict          # tower name -> {key: np.ndarray}: the flat params argument of its program
  functions: dict       # tower name -> jax.export.Exported

  def __post_init__(self):
    # jit around .call: one compilation per batch size instead of a fresh trace per request.
    self._calls = {name: jax.jit(exported.call) for name, exported in self.functions.items()}

  @property
  def dims(self) -> dict:
    return self.manifest["dims"]

  @property
  def step(self) -> int:
    return int(self.manifest["step"])

  def _run(self, tower: str, *args) -> np.ndarray:
    if args[0].shape[0] == 0:   # the symbolic batch dimension is >= 1
      return np.zeros((0, self.dims["embed_dim"]), np.float32)
    out = self._calls[tower](self.params[tower], *args)
    return np.asarray(out, np.float32)


@dataclasses.dataclass
class Bundle(ExportedTowers):
  """The OmniSearchSage bundle: query and entity towers."""

  def embed_queries(self, tokens) -> np.ndarray:
    """tokens: int [B, L] WordPiece ids (0 = padding), padded/cropped to query_len -> [B, D]."""
    tokens = _fit(_int_matrix(tokens, "tokens"), self.dims["query_len"])
    return self._run("query_tower", tokens)

  def embed_entities(self, tokens, fields, continuous) -> np.ndarray:
    """tokens, fields: int [B, T] stacked n-gram ids and their field ids, padded/cropped to
    entity_tokens; continuous: [B, continuous_dim] (zeros where a feature is missing) -> [B, D]."""
    tokens = _int_matrix(tokens, "tokens")
    fields = _int_matrix(fields, "fields")
    if fields.shape != tokens.shape:
      raise ValueError(f"fields {fields.shape} and tokens {tokens.shape} differ in shape")
    continuous = np.asarray(continuous, np.float32)
    want = (tokens.shape[0], self.dims["continuous_dim"])
    if continuous.shape != want:
      raise ValueError(f"continuous has shape {continuous.shape}, expected {want}")
    n = self.dims["entity_tokens"]
    return self._run("entity_tower", _fit(tokens, n), _fit(fields, n), continuous)


def load_bundle(path: str) -> Bundle:
  """Verifies and loads the bundle at `path` (see the module docstring for what is checked)."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise BundleError(f"{manifest_path} not found: not an export bundle")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise BundleError(f"{MANIFEST}: unreadable ({error})") from error

  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise BundleError(f"{MANIFEST}: format_version {version!r} is not supported: this loader "
                      f"reads format_version {FORMAT_VERSION} only")
  _verify_files(path, manifest.get("files", {}))

  params = _load_params(path, manifest)
  functions = {}
  for name in TOWERS:
    fname = manifest["towers"][name]["function"]
    try:
      with open(os.path.join(path, fname), "rb") as f:
        functions[name] = jax.export.deserialize(bytearray(f.read()))
    except Exception as error:   # any failure to parse means the same thing: not servable
      raise BundleError(f"{fname}: cannot be deserialised ({error})") from error
  _check_dims(manifest, params, functions)
  return Bundle(path=path, manifest=manifest, params=params, functions=functions)


def _verify_files(path: str, files: dict):
  needed = {PARAMS_FILE, *(f"{name}.jaxexport" for name in TOWERS)}
  missing = needed - set(files)
  if missing:
    raise BundleError(f"{MANIFEST}: no checksum for {sorted(missing)}")
  root = os.path.realpath(path)
  for name, info in files.items():
    full = os.path.realpath(os.path.join(path, name))
    if not full.startswith(root + os.sep):   # a manifest must not point outside its bundle
      raise BundleError(f"{MANIFEST}: file {name!r} lies outside the bundle")
    if not os.path.isfile(full):
      raise BundleError(f"{name}: listed in {MANIFEST} but missing")
    if sha256_of(full) != info.get("sha256"):
      raise BundleError(f"{name}: sha256 does not match {MANIFEST} (damaged or modified file)")


def _load_params(path: str, manifest: dict) -> dict:
  flat = safetensors.numpy.load_file(os.path.join(path, PARAMS_FILE))
  params = {}
  for name in TOWERS:
    params[name] = {}
    for entry in manifest["towers"][name]["params"]:
      key = f"{name}/{entry['key']}"
      if key not in flat:
        raise BundleError(f"{PARAMS_FILE}: no tensor {key!r}")
      value = flat[key]
      if list(value.shape) != entry["shape"] or str(value.dtype) != entry["dtype"]:
        raise BundleError(f"{PARAMS_FILE}: {key!r} is {value.dtype}{list(value.shape)}, the "
                          f"manifest says {entry['dtype']}{entry['shape']}")
      params[name][entry["key"]] = value
  return params


def _check_dims(manifest: dict, params: dict, functions: dict):
  """Every manifest dim against the programs' signatures (and num_fields against the weights)."""
  dims = manifest.get("dims", {})

  def expect(field: str, actual, where: str):
    if field not in dims:
      raise BundleError(f"{MANIFEST}: dims.{field} is missing")
    if dims[field] != actual:
      raise BundleError(f"{MANIFEST}: dims.{field} = {dims[field]} but {where} has {actual}")

  signatures = {}
  for name, exported in functions.items():
    (flat_params, *inputs), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    if set(flat_params) != set(params[name]):
      raise BundleError(f"{name}.jaxexport: takes params {sorted(flat_params)}, the manifest "
                        f"lists {sorted(params[name])}")
    for key, aval in flat_params.items():
      if tuple(aval.shape) != params[name][key].shape:
        raise BundleError(f"{name}.jaxexport: param {key!r} has shape {aval.shape}, "
                          f"{PARAMS_FILE} has {params[name][key].shape}")
    signatures[name] = ([a.shape for a in inputs], exported.out_avals[0].shape)

  (query_tokens,), query_out = signatures["query_tower"]
  (tokens, fields, continuous), entity_out = signatures["entity_tower"]
  expect("query_len", query_tokens[1], "query_tower.jaxexport's tokens input")
  expect("entity_tokens", tokens[1], "entity_tower.jaxexport's tokens input")
  expect("entity_tokens", fields[1], "entity_tower.jaxexport's fields input")
  expect("continuous_dim", continuous[1], "entity_tower.jaxexport's continuous input")
  expect("embed_dim", query_out[-1], "query_tower.jaxexport's output")
  expect("embed_dim", entity_out[-1], "entity_tower.jaxexport's output")
  # One LayerNorm per field: the field count is the first dim of the per-field scale.
  expect("num_fields", params["entity_tower"]["hash/field_scale"].shape[0],
         "entity_tower's hash/field_scale")
  if not 0 < dims.get("compat_dim", 0) <= dims["embed_dim"]:
    raise BundleError(f"{MANIFEST}: dims.compat_dim = {dims.get('compat_dim')} must be in "
                      f"1..embed_dim ({dims['embed_dim']})")


def _int_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be an integer [B, L] array, got {x.dtype}{list(x.shape)}")
  return x.astype(np.int32)


def _fit(x: np.ndarray, length: int) -> np.ndarray:
  """Pads with 0 (padding id) or crops to `length` columns, as training batches do."""
  if x.shape[1] >= length:
    return np.ascontiguousarray(x[:, :length])
  return np.pad(x, ((0, 0), (0, length - x.shape[1])))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
