"""Export a trained checkpoint as a self-contained serving bundle (SPEC §1 "Serving").

Production embeds queries online behind a cache and pins/products in a daily offline batch; both
need the towers WITHOUT the training code. A bundle holds each tower as a serialised `jax.export`
program (StableHLO, lowered for CPU and CUDA, batch dimension symbolic) plus its weights, so
`omnisage.serving.bundle.loader.load_bundle` runs it with nothing but JAX, NumPy and safetensors.

Bundle layout (`<out>/`):

  manifest.json            format_version, versions, checkpoint step, dims, tokenizer and hashing
                           config, each
                           tower's param keys/shapes/dtypes (its flat params argument), file sha256
  query_tower.jaxexport    fn(params, tokens[b, query_len + query_lexical_len] int32)
                              -> [b, embed_dim] (query_input.py: WordPiece then n-gram ids)
  entity_tower.jaxexport   fn(params, tokens[b, T] int32, fields[b, T] int32,
                              continuous[b, continuous_dim] float32) -> [b, embed_dim]
  params.safetensors       every tower's variables, keys "<tower>/<key>" (key: the variable's path
                           joined by '/', as in the program's flat params dict argument): the
                           trained params AND the constants the tower reads (the hash-index table)
  query_vocab.txt, ngram_vocab/*.txt   the prepared vocabularies (tokenisation happens outside;
                           the query tower's lexical path and the entity tower share ngram_vocab)

Usage: `summary = export_bundle(config, "runs/demo", "runs/demo/bundle")`.
"""

import os
import shutil

import jax
import numpy as np

import omnisage
from omnisage.data.omnisearchsage.query_input import lexical_len
from omnisage.data.omnisearchsage.schema import FIELDS, vocab_sizes_of
from omnisage.data.workdir import prepared_dir_of
from omnisage.models import CONTINUOUS_DIM
from omnisage.models.omnisearchsage import output_dim
from omnisage.serving.bundle.writer import PLATFORMS, publish_bundle, start_bundle, write_towers
from omnisage.train import sharding
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.loop import restore_for_eval
from omnisage.train.omnisearchsage.state import create_train_state

FORMAT_VERSION = 1
TOWERS = ("query_tower", "entity_tower")
FEATURIZATION = ("field_max_tokens", "max_entity_tokens", "max_text_chars")


def export_bundle(config, workdir: str, out_dir: str) -> dict:
  """Writes the bundle of `workdir`'s selected checkpoint (checkpoint.select_checkpoint), else
  its newest, to `out_dir`; returns a summary."""
  if jax.process_count() > 1:
    # Every host would write the same directory, and sharded params are not all addressable here.
    raise ValueError("export runs in a single process: drop the multi-host flags")
  prepared = prepared_dir_of(config, workdir)
  vocab_sizes = vocab_sizes_of(prepared)
  if not Checkpointer(workdir).steps():   # said before the (slow) model build
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  # The same state evaluate_checkpoint builds (without the entity stores, which export never reads).
  state, statics = create_train_state(config, vocab_sizes, sharding.make_mesh(config.mesh))
  step, trained = restore_for_eval(config, workdir, state)
  model = statics.model(trained.params)

  dims = {"embed_dim": output_dim(config.model), "compat_dim": int(config.model.compat_dim),
          "query_len": int(config.data.batch_query_len),
          "entity_tokens": int(config.data.max_entity_tokens),
          "continuous_dim": int(CONTINUOUS_DIM), "num_fields": len(FIELDS)}
  if lexical_len(config):   # the query tower reads packed rows: WordPiece, then n-gram ids
    dims["query_lexical_len"] = lexical_len(config)   # (query_input.py)
  b = jax.export.symbolic_shape("b")[0]
  inputs = {
      "query_tower": (jax.ShapeDtypeStruct(
          (b, dims["query_len"] + dims.get("query_lexical_len", 0)), np.int32),),
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
      # What featurises a RAW pin/product row exactly as prepare did (raw_entities.py).
      "featurization": {key: int(config.data[key]) for key in FEATURIZATION},
      "hashing": {"hash_rows": int(config.model.hash_rows),
                  "hash_seed": int(config.model.hash_seed), "V": int(vocab_sizes["ngram"])},
      "towers": {name: {"function": f"{name}.jaxexport", "params": trees[name]} for name in TOWERS},
  }
  files = publish_bundle(tmp, out_dir, manifest)
  return {"bundle": os.path.abspath(out_dir), "step": int(step), "dims": dims,
          "files": {name: info["bytes"] for name, info in files.items()}}


