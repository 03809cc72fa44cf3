"""`launch.py demo`: OmniSearchSage end to end on the built-in synthetic world, with its tables.

prepare -> train -> eval -> export -> embed -> index -> three example searches, from scratch in
one workdir. Only the demo's own outputs are removed first, never the whole workdir, so the
prepared data of an earlier run is rebuilt in place.

Usage: `summary = run_demo(get_config(), "runs/demo")`   # `make demo`
"""

import json
import os
import shutil

from omnisage.systems import get_system

# The training half starts afresh so the demo always shows learning.
FRESH = ("checkpoints", "tensorboard", "train_metrics.jsonl", "eval_trained.json",
         "eval_untrained.json")


def run_demo(config, workdir: str) -> dict:
  system = get_system(config)
  for name in FRESH:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  print(json.dumps({"prepare": system.run("prepare", config, workdir)}), flush=True)
  trained = system.run("train", config, workdir)
  print(json.dumps({"train": trained}), flush=True)
  result = system.run("evaluate", config, workdir)   # prints the recall table
  retrieval = demo_serving(config, workdir)
  return {"recall@10": result["recall@10"], "train_seconds": trained["train_seconds"],
          "examples_per_second": trained["examples_per_second"], "retrieval": retrieval}


def demo_serving(config, workdir: str) -> dict:
  """The serving half of the demo: export -> embed -> index -> example searches."""
  from omnisage.data.workdir import prepared_dir_of
  from omnisage.serving.index.embed import KINDS, embed_entities
  from omnisage.serving.index.scann_index import build_index
  bundle = os.path.join(workdir, "bundle")
  embeddings = os.path.join(workdir, "embeddings")
  index = os.path.join(workdir, "index")
  exported = get_system(config).run("export", config, workdir, bundle)
  print(json.dumps({"export": {"bundle": bundle, "step": exported["step"]}}), flush=True)
  entities = os.path.join(prepared_dir_of(config, workdir), "entities")
  for kind in KINDS:   # shards of the previous demo's bundle are recomputed (checksum differs)
    done = embed_entities(bundle, os.path.join(entities, f"{kind}.parquet"), embeddings)
    print(json.dumps({"embed": {k: done[k] for k in ("kind", "rows", "rows_per_second")}}),
          flush=True)
  built = build_index(embeddings, index)
  print_retrieval_table(built["kinds"])
  print_example_searches(bundle, index)
  pins = built["kinds"]["pins"]
  return {"scann_recall@10": pins["recall@10"], "scann_qps": round(pins["qps"], 1),
          "exact_qps": round(pins["exact_qps"], 1), "met_target": pins["met_target"],
          "kinds": {kind: {"recall@10": r["recall@10"], "qps": round(r["qps"], 1),
                           "exact_qps": round(r["exact_qps"], 1)}
                    for kind, r in built["kinds"].items()}}


def print_retrieval_table(kinds: dict):
  print("ScaNN index vs exact search (held-out query embeddings, Recall@10 against exact):")
  print(f"{'kind':<10} {'rows':>7} {'leaves searched/leaves':>23} {'reorder':>8} "
        f"{'recall@10':>10} {'QPS':>9} {'exact QPS':>10}")
  for kind, r in kinds.items():
    p = r["params"]   # small tables are searched brute force: no tree, no reorder
    leaves = f"{p.get('leaves_to_search') or '-'}/{p.get('num_leaves') or '-'}"
    print(f"{kind:<10} {r['size']:>7} {leaves:>23} {str(p.get('reorder') or '-'):>8} "
          f"{r['recall@10']:>10.4f} {r['qps']:>9.0f} {r['exact_qps']:>10.0f}")


def print_example_searches(bundle_path: str, index_path: str, top: int = 3):
  """Three real queries (spread over the query table) through tokenizer -> bundle -> index."""
  from omnisage.data.omnisearchsage.query_input import QueryEncoder
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.index.scann_index import load_index
  bundle = load_bundle(bundle_path)
  tokenizer = QueryEncoder.from_bundle(bundle)
  indexes = load_index(index_path)
  titles = indexes["queries"].titles
  texts = [titles[i] for i in (0, len(titles) // 3, 2 * len(titles) // 3)]
  vectors = bundle.embed_queries(tokenizer.encode_batch(texts, bundle.dims["query_len"]))
  for text, vector in zip(texts, vectors):
    print(f"search {text!r}:")
    for kind, index in indexes.items():
      scores, rows = index.search(vector[None], top)
      # Some synthetic entities have no text at all (SPEC: features can be missing): show the id.
      found = ", ".join(f"{(index.titles[r] or index.ids[r])[:40]!r} ({s:.2f})"
                        for s, r in zip(scores[0], rows[0]))
      print(f"  {kind:<9} {found}")
