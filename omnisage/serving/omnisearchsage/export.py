"""Export a trained checkpoint as a self-contained serving bundle (SPEC §1 "Serving").

Production embeds queries online behind a cache and pins/products in a daily offline batch; both
need the towers WITHOUT the training code. A bundle holds each tower as a serialised `jax.export`
program (StableHLO, lowered for CPU and CUDA, batch dimension symbolic) plus its weights, so
`omnisage.serving.bundle.loader.load_bundle` runs it with nothing but JAX, NumPy and safetensors.

Bundle layout (`<out>/`):

  manifest.json            format_version, versions, checkpoint step, dims, tokenizer and hashing
                           config, each
                           tower's param keys/shapes/dtypes (its flat params argument), file sha256
  query_tower.jaxexport    fn(params, tokens[b, query_len] int32) -> [b, embed_dim]
  entity_tower.jaxexport   fn(params, tokens[b, T] int32, fields[b, T] int32,
                              continuous[b, continuous_dim] float32) -> [b, embed_dim]
  params.safetensors       every tower's variables, keys "<tower>/<key>" (key: the variable's path
                           joined by '/', as in the program's flat params dict argument): the
                           trained params AND the constants the tower reads (the hash-index table)
  query_vocab.txt, ngram_vocab/*.txt   the prepared vocabularies (tokenisation happens outside)

Usage: `summary = export_bundle(config, "runs/demo", "runs/demo/bundle")`.
"""

import json
import os
import shutil

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

import omnisage
from omnisage.data.omnisearchsage.schema import FIELDS
from omnisage.models import CONTINUOUS_DIM
from omnisage.serving.bundle.loader import sha256_of
from omnisage.train import sharding
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.omnisearchsage.trainer import prepared_dir_of, vocab_sizes_of
from omnisage.train.state import abstract_state, create_train_state

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")
TOWERS = ("query_tower", "entity_tower")
PARAMS_FILE = "params.safetensors"
MANIFEST = "manifest.json"


def export_bundle(config, workdir: str, out_dir: str) -> dict:
  """Writes the bundle of the newest checkpoint of `workdir` to `out_dir`; returns a summary."""
  if jax.process_count() > 1:
    # Every host would write the same directory, and sharded params are not all addressable here.
    raise ValueError("export runs in a single process: drop the multi-host flags")
  prepared = prepared_dir_of(config, workdir)
  vocab_sizes = vocab_sizes_of(prepared)
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  missing = f"no checkpoint under {workdir}/checkpoints: run `launch.py train`"
  if not ckpt.steps():   # said before the (slow) model build
    raise FileNotFoundError(missing)
  # The same state evaluate_checkpoint builds (without the entity stores, which export never reads).
  state, statics = create_train_state(config, vocab_sizes, sharding.make_mesh(config.mesh))
  restored = ckpt.restore_latest(abstract_state(state))
  if restored is None:
    raise FileNotFoundError(missing)
  step, trained, _ = restored
  model = statics.model(trained.params)

  dims = {"embed_dim": int(config.model.embed_dim), "compat_dim": int(config.model.compat_dim),
          "query_len": int(config.data.batch_query_len),
          "entity_tokens": int(config.data.max_entity_tokens),
          "continuous_dim": int(CONTINUOUS_DIM), "num_fields": len(FIELDS)}
  b = jax.export.symbolic_shape("b")[0]
  inputs = {
      "query_tower": (jax.ShapeDtypeStruct((b, dims["query_len"]), np.int32),),
      "entity_tower": (jax.ShapeDtypeStruct((b, dims["entity_tokens"]), np.int32),
                       jax.ShapeDtypeStruct((b, dims["entity_tokens"]), np.int32),
                       jax.ShapeDtypeStruct((b, dims["continuous_dim"]), np.float32)),
  }

  tmp = start_bundle(out_dir)
  trees = write_towers(tmp, model, inputs)
  shutil.copy(os.path.join(prepared, "query_vocab.txt"), tmp)
  shutil.copytree(os.path.join(prepared, "ngram_vocab"), os.path.join(tmp, "ngram_vocab"))
  manifest = {
      "format_version": FORMAT_VERSION,
      "omnisage_version": omnisage.__version__,
      "jax_version": jax.__version__,
      "step": int(step),
      "platforms": list(PLATFORMS),
      "dims": dims,
      # How serving turns query text into the tokens the query tower reads: BERT WordPiece over
      # query_vocab.txt (omnisage.data.tokenizer reproduces tensorflow-text's FastBertTokenizer).
      "tokenizer": {"kind": "bert_wordpiece", "vocab": "query_vocab.txt",
                    "lower_case": bool(config.data.query_lower_case),
                    "max_len": int(config.data.query_max_len)},
      "hashing": {"hash_rows": int(config.model.hash_rows),
                  "hash_seed": int(config.model.hash_seed), "V": int(vocab_sizes["ngram"])},
      "towers": {name: {"function": f"{name}.jaxexport", "params": trees[name]} for name in TOWERS},
  }
  files = publish_bundle(tmp, out_dir, manifest)
  return {"bundle": os.path.abspath(out_dir), "step": int(step), "dims": dims,
          "files": {name: info["bytes"] for name, info in files.items()}}


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

