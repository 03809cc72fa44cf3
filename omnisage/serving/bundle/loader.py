"""Load a serving bundle written by `launch.py export` and embed with it (SPEC §1 "Serving").

This is what a model server (online query embeddings) or a batch job (daily pin/product
embeddings) imports. It needs NO model code: only JAX, NumPy, safetensors and the standard
library. The towers are `jax.export` programs, so a server runs exactly the computation that was
trained, whatever the omnisage source tree looks like at serving time.

Before anything runs, `load_bundle` refuses (BundleError) a bundle whose manifest is malformed
(`check_manifest`: the types and required keys; the message names the key path), whose
format_version this loader does not read, which names a file outside the bundle directory (after
symlinks) or one without a checksum, whose files do not match their sha256 and size in the
manifest, or whose manifest dims disagree with the shapes of the exported programs and weights: a
bundle is either exactly what was exported or not served at all.

Usage:
  bundle = load_bundle("runs/demo/bundle")
  q = bundle.embed_queries(query_tokens)                       # [B, embed_dim] float32
  p = bundle.embed_entities(tokens, fields, continuous)        # [B, embed_dim] float32
"""

import dataclasses
import hashlib
import json
import os
import re

import jax
import numpy as np
import safetensors.numpy

FORMAT_VERSION = 1   # the one format_version this loader reads
MANIFEST = "manifest.json"
PARAMS_FILE = "params.safetensors"
TOWERS = ("query_tower", "entity_tower")
DIMS = ("embed_dim", "compat_dim", "query_len", "entity_tokens", "continuous_dim", "num_fields")


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

  @property
  def query_lexical_len(self) -> int:
    """Width of the n-gram part of a query row (the lexical path); 0: WordPiece ids only."""
    return int(self.dims.get("query_lexical_len", 0))

  def embed_queries(self, tokens) -> np.ndarray:
    """tokens: int [B, L] WordPiece ids (0 = padding), padded/cropped to query_len -> [B, D].
    A lexical bundle takes packed rows [B, query_len + query_lexical_len] exactly
    (`omnisage.data.omnisearchsage.query_input.QueryEncoder.from_bundle` makes them)."""
    tokens = _int_matrix(tokens, "tokens")
    if self.query_lexical_len:
      width = self.dims["query_len"] + self.query_lexical_len
      if tokens.shape[1] != width:
        raise ValueError(f"this bundle's query tower has a lexical path: tokens must be "
                         f"[B, {width}] (query_len {self.dims['query_len']} WordPiece ids, then "
                         f"{self.query_lexical_len} n-gram ids), got {list(tokens.shape)}; use "
                         "QueryEncoder.from_bundle")
    else:
      tokens = _fit(tokens, self.dims["query_len"])
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
  manifest = read_manifest(path)
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise BundleError(f"{MANIFEST}: format_version {version!r} is not supported: this loader "
                      f"reads format_version {FORMAT_VERSION} only")
  check_manifest(manifest, TOWERS, DIMS, {"tokenizer": TOKENIZER, "hashing": HASHING})
  verify_files(path, manifest, {PARAMS_FILE, *(f"{name}.jaxexport" for name in TOWERS)})
  if "tokenizer" in manifest:   # WordPieceTokenizer.from_bundle opens it: confined here
    bundle_file(path, manifest, "tokenizer.vocab", manifest["tokenizer"]["vocab"])

  params = _load_params(path, manifest)
  functions = {name: load_function(path, manifest, name) for name in TOWERS}
  _check_dims(manifest, params, functions)
  return Bundle(path=path, manifest=manifest, params=params, functions=functions)


# --- the manifest's shape ------------------------------------------------------------------------
# Checked whole before any value is used, so a hand-edited or hostile manifest is a BundleError
# naming the key ("manifest.json: dims.compat_dim must be a positive int, got 'abc'"), never a
# TypeError deep inside the loader or a 500 from /healthz. Each kind is (what the message says
# it must be, test). bool is an int subclass in Python, so ints exclude it explicitly.

def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


INT = ("an int", _is_int)
COUNT = ("an int >= 0", lambda x: _is_int(x) and x >= 0)
POSITIVE_INT = ("a positive int", lambda x: _is_int(x) and x > 0)
NUMBER = ("a number", lambda x: isinstance(x, (int, float)) and not isinstance(x, bool))
BOOL = ("a bool", lambda x: isinstance(x, bool))
STR = ("a non-empty string", lambda x: isinstance(x, str) and x != "")
STR_LIST = ("a list of strings", lambda x: isinstance(x, list)
            and all(isinstance(v, str) for v in x))
OBJECT = ("a JSON object", lambda x: isinstance(x, dict))
LIST = ("a list", lambda x: isinstance(x, list))
SHAPE = ("a list of ints >= 0", lambda x: isinstance(x, list) and all(COUNT[1](d) for d in x))
SHA256 = ("64 lowercase hex digits (a sha256)",
          lambda x: isinstance(x, str) and re.fullmatch("[0-9a-f]{64}", x) is not None)

# Every bundle kind (this one and serving/twotower/bundle.py): {key: (kind, required)}.
TOP_LEVEL = {"format_version": (INT, True), "step": (COUNT, True), "system": (STR, False),
             "omnisage_version": (STR, False), "jax_version": (STR, False),
             "platforms": (STR_LIST, False)}
# The OmniSearchSage sections: optional (the first bundles had no tokenizer), typed when present.
TOKENIZER = {"kind": STR, "vocab": STR, "lower_case": BOOL, "max_len": POSITIVE_INT}
HASHING = {"hash_rows": POSITIVE_INT, "hash_seed": INT, "V": POSITIVE_INT}


def read_manifest(path: str) -> dict:
  """`path`/manifest.json as a dict; BundleError when missing, unreadable or not an object."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise BundleError(f"{manifest_path} not found: not an export bundle")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError, RecursionError) as error:   # ValueError: JSON, UTF-8
    raise BundleError(f"{MANIFEST}: unreadable ({error})") from error
  if not isinstance(manifest, dict):
    raise BundleError(f"{MANIFEST}: must be a JSON object, got a JSON "
                      f"{_JSON_TYPES.get(type(manifest), type(manifest).__name__)}")
  return manifest


def check_manifest(manifest: dict, towers, dims, sections: dict | None = None):
  """Types and required keys of a (JSON object) manifest; BundleError naming the first bad key.

  towers: the tower names it must list, each {function: file name, params: [{key, shape,
  dtype}]}. dims: the dims it must have (every dim, listed or not, is a positive int).
  sections: {name: {field: kind}} of optional sections whose fields are all required.
  """
  for name, (kind, required) in TOP_LEVEL.items():
    _field(manifest, name, "", kind, required)
  found = _field(manifest, "dims", "", OBJECT)
  for name in dims:
    _field(found, name, "dims.", POSITIVE_INT)
  for name in found:
    _field(found, name, "dims.", POSITIVE_INT)
  found = _field(manifest, "towers", "", OBJECT)
  if set(found) != set(towers):
    raise BundleError(f"{MANIFEST}: towers must be exactly {sorted(towers)}, got "
                      f"{sorted(found)}")
  for name in towers:
    tower = _field(found, name, "towers.", OBJECT)
    _field(tower, "function", f"towers.{name}.", STR)
    for i, entry in enumerate(_field(tower, "params", f"towers.{name}.", LIST)):
      prefix = f"towers.{name}.params[{i}]"
      _check(entry, prefix, OBJECT)
      _field(entry, "key", prefix + ".", STR)
      _field(entry, "shape", prefix + ".", SHAPE)
      _field(entry, "dtype", prefix + ".", STR)
  for name, info in _field(manifest, "files", "", OBJECT).items():
    prefix = f"files[{name!r}]"
    _check(info, prefix, OBJECT)
    _field(info, "sha256", prefix + ".", SHA256)
    _field(info, "bytes", prefix + ".", COUNT)
  for section, fields in (sections or {}).items():
    found = _field(manifest, section, "", OBJECT, required=False)
    for name, kind in fields.items() if found is not None else ():
      _field(found, name, f"{section}.", kind)


def _field(obj: dict, name: str, prefix: str, kind, required: bool = True):
  """obj[name] after checking it is of `kind`; None when absent and not required."""
  if name not in obj:
    if required:
      raise BundleError(f"{MANIFEST}: {prefix}{name} is missing")
    return None
  return _check(obj[name], prefix + name, kind)


def _check(value, key: str, kind):
  expected, ok = kind
  if not ok(value):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise BundleError(f"{MANIFEST}: {key} must be {expected}, got {shown} "
                      f"({_JSON_TYPES.get(type(value), type(value).__name__)})")
  return value


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "int", float: "float",
               bool: "bool", type(None): "null"}


def load_function(path: str, manifest: dict, tower: str):
  """The deserialised `jax.export` program of a tower (its confined, checksummed file)."""
  fname = manifest["towers"][tower]["function"]
  full = bundle_file(path, manifest, f"towers.{tower}.function", fname)
  try:
    with open(full, "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))
  except Exception as error:   # any failure to parse means the same thing: not servable
    raise BundleError(f"{fname}: cannot be deserialised ({error})") from error


def bundle_file(path: str, manifest: dict, key: str, name: str) -> str:
  """The real path of the file that manifest key `key` names (`name`, relative to the bundle):
  it must stay inside the bundle directory once symlinks are resolved, and be listed in
  manifest["files"] (so it is checksummed); BundleError naming the key otherwise."""
  full = confined(path, name, key)
  if name not in manifest["files"]:
    raise BundleError(f"{MANIFEST}: {key} {name!r} is not listed in files (no checksum)")
  return full


def confined(path: str, name: str, key: str) -> str:
  """os.path.realpath of `path`/`name`, refused (BundleError naming `key`) unless it lies inside
  the bundle directory: no absolute paths, no '..' and no symlink out of the bundle."""
  root = os.path.realpath(path)
  full = os.path.realpath(os.path.join(root, name))
  if os.path.isabs(name) or not full.startswith(root + os.sep):
    raise BundleError(f"{MANIFEST}: {key} {name!r} lies outside the bundle directory")
  return full


def verify_files(path: str, manifest: dict, needed):
  """Every file of manifest["files"] (confined to the bundle) against its size and sha256; the
  names in `needed` must be among them."""
  files = manifest["files"]
  missing = set(needed) - set(files)
  if missing:
    raise BundleError(f"{MANIFEST}: no checksum for {sorted(missing)}")
  for name, info in files.items():
    full = confined(path, name, "files entry")
    if not os.path.isfile(full):
      raise BundleError(f"{name}: listed in {MANIFEST} but missing")
    if os.path.getsize(full) != info["bytes"] or sha256_of(full) != info["sha256"]:
      raise BundleError(f"{name}: sha256 does not match {MANIFEST} (damaged or modified file)")


def load_safetensors(path: str) -> dict:
  """{key: array} of a bundle's params file; BundleError when it does not parse."""
  try:
    return safetensors.numpy.load_file(os.path.join(path, PARAMS_FILE))
  except Exception as error:   # SafetensorError is no ValueError; any failure: not servable
    raise BundleError(f"{PARAMS_FILE}: cannot be read ({error})") from error


def _load_params(path: str, manifest: dict) -> dict:
  flat = load_safetensors(path)
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
    value = dims[field]
    if not _is_int(value):   # check_manifest refuses this first; the message stays sane anyway
      raise BundleError(f"{MANIFEST}: dims.{field} must be an int, got {value!r} "
                        f"({type(value).__name__}); {where} has {actual}")
    if value != actual:
      raise BundleError(f"{MANIFEST}: dims.{field} = {value} but {where} has {actual}")

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
  lexical = dims.get("query_lexical_len", 0)   # optional: bundles without the lexical path
  if not _is_int(lexical) or lexical < 0:
    raise BundleError(f"{MANIFEST}: dims.query_lexical_len must be an int >= 0, got {lexical!r}")
  expect("query_len", query_tokens[1] - lexical,
         "query_tower.jaxexport's tokens input (less dims.query_lexical_len)")
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
