"""Writing a serving bundle, shared by every system's export (SPEC §1 "Serving").

A bundle is a directory: each tower as a serialised `jax.export` program (StableHLO for CPU and
CUDA, batch dimension symbolic), all weights in one safetensors file, and a manifest with every
file's sha256. It is written into `<out>.partial` and renamed into place only when complete, so a
failed export never leaves something that looks like a bundle. `loader.py` reads it back with no
model code.

Usage:
  tmp = start_bundle(out)
  trees = write_towers(tmp, model, {"query_tower": (spec,), ...})
  publish_bundle(tmp, out, manifest)
"""

import json
import os
import shutil

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from omnisage.serving.bundle.loader import MANIFEST, PARAMS_FILE, sha256_of

PLATFORMS = ("cpu", "cuda")


def start_bundle(out_dir: str) -> str:
  """A fresh `<out_dir>.partial` to write a bundle into. Writing next to the target and renaming
  at the end (publish_bundle) means a failed export never leaves a bundle that looks complete."""
  tmp = os.path.abspath(out_dir) + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def write_towers(tmp: str, model, inputs: dict) -> dict:
  """Exports `model.<name>` for each name of `inputs` ({tower: input specs}) to <name>.jaxexport
  and all their weights to params.safetensors ("<tower>/<key>"); returns each tower's param list
  (key, shape, dtype) for the manifest."""
  flat, trees = {}, {}
  for name, specs in inputs.items():
    params, blob = export_tower(getattr(model, name), specs)
    with open(os.path.join(tmp, f"{name}.jaxexport"), "wb") as f:
      f.write(blob)
    flat.update({f"{name}/{key}": leaf for key, leaf in params.items()})
    trees[name] = [{"key": key, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
                   for key, leaf in params.items()]
  safetensors.numpy.save_file(flat, os.path.join(tmp, PARAMS_FILE))
  return trees


def publish_bundle(tmp: str, out_dir: str, manifest: dict) -> dict:
  """Adds the sha256 and size of every file under `tmp` to `manifest` ("files"), writes it, and
  replaces `out_dir` with `tmp` whole (never mixing old and new files). Refuses to replace a
  directory that is not a bundle. Returns the files entry."""
  files = {}
  for root, _, names in os.walk(tmp):
    for fname in sorted(names):
      full = os.path.join(root, fname)
      files[os.path.relpath(full, tmp)] = {"sha256": sha256_of(full),
                                           "bytes": os.path.getsize(full)}
  manifest = {**manifest, "files": dict(sorted(files.items()))}
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
      shutil.rmtree(tmp)
      raise ValueError(f"{out_dir} exists and is not a bundle: refusing to overwrite it")
    shutil.rmtree(out_dir)  # a previous bundle: replaced whole, never mixed with the new one
  os.rename(tmp, out_dir)
  return manifest["files"]


def export_tower(tower: nnx.Module, inputs: tuple) -> tuple[dict, bytes]:
  """({'/'-joined path: host array}, serialised jax.export program) of one tower."""
  # All variables (Params and the HashIndices constant): the exported program takes them as
  # arguments rather than baked-in constants, so the weights live in the safetensors file.
  graphdef, variables = nnx.split(tower)
  # A FLAT dict of host arrays: nnx.State does not serialise in jax.export, nor do the int keys of
  # nnx.List entries in a nested pure dict; and the checkpoint's device shardings must not leak
  # into the program's signature. The flat keys are also the safetensors keys, so the loader
  # needs no tree structure beyond the key list.
  paths = dict(_leaves_with_paths(jax.device_get(nnx.to_pure_dict(variables))))
  params = {"/".join(map(str, path)): leaf for path, leaf in paths.items()}

  def apply(flat, *args):
    nested = {}
    for path in paths:
      node = nested
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = flat["/".join(map(str, path))]
    target = jax.tree.map(lambda x: x, variables)   # a fresh State to fill with the tracers
    nnx.replace_by_pure_dict(target, nested)
    return nnx.merge(graphdef, target)(*args)

  specs = {key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for key, leaf in params.items()}
  exported = jax.export.export(jax.jit(apply), platforms=PLATFORMS)(specs, *inputs)
  return params, exported.serialize()


def _leaves_with_paths(tree: dict, prefix: tuple = ()):
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, dict):
      yield from _leaves_with_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), np.ascontiguousarray(value)
