"""Home Depot retrieval benchmark: BM25, off-the-shelf MiniLM and OmniSearchSage with ablations.

Exactly the protocol of ../shared/datasets/README.md (omnisage/data/sources/homedepot.py): latin-1
train.csv.gz, positives relevance >= 2.67, test queries crc32 % 5 == 0 (1,914 queries, 6,803
pairs), corpus = all 54,667 products, recall@10 and pair_recall@10 over the full corpus
(omnisage/train/evaluators/corpus.py). Test queries never reach training; about 1 in 10 training
queries is held out as the VALIDATION split used for model selection (config choices were made on
it, never on test), and its recall@10 is reported next to the test figures. The checkpoint of
each run that scores best on validation is the one measured on test (early stopping).

Rows, all in one run (by default omnisage_multi and lexical_channel; --variants picks others):
  bm25                 bm25s, English stemmer + stopwords (README: 0.432 / 0.530)
  minilm               all-MiniLM-L6-v2 sentence embeddings, no training (README: 0.343 / 0.381)
  omnisage_single      query->product only (no query->query, no compatibility task)
  omnisage_multi       query->product + query->query + compatibility (the main model)
  multi_no_logq        the main model without logQ correction
  multi_inbatch_only   the main model without random negatives (in-batch negatives only)
  judged_negatives     the main model plus 2 judged hard negatives per row (relevance < 2)
  mined_negatives      the main model trained half-way, negatives mined from that checkpoint and
                       BM25 (launch.py mine), then the second half with 2 mined negatives per row
  full_finetune        the main model with no frozen query-tower layer
  lexical              the main model with the query tower's lexical path (the query's n-grams
                       through the product tower's hash table; model.query.lexical)
  lexical_channel      the main model with the lexical channel: both towers' title n-grams
                       through one shared map, concatenated to the dense output, the n-gram
                       cosine's share of the score learned (model.lexical_dim)
  lexical_channel_wide the same with 512-d n-gram vectors
  all_together         lexical channel, judged + mined negatives and full fine-tuning
  hybrid               BM25 + the best omnisage row (chosen on validation), fused by a weighted
                       sum of normalised scores whose weight is tuned on validation
                       (omnisage/serving/index/hybrid.py); not a trained row

The closing JSON's "methods" holds every row under its name, "omnisage" being the best omnisage
row on validation.

Steps: MiniLM embeds every title and the test/validation queries once (cached under --workdir,
keyed by the checkpoint and the texts); the title embeddings, PCA-rotated to 256 dims, are the
frozen "legacy" product vectors (ItemSage stand-in); raw tables -> `prepare` once; then each
omnisage variant trains from scratch in its own directory and is scored on the whole corpus.

Usage:
  .venv/bin/python benchmarks/homedepot.py --datasets ../shared/datasets
  .venv/bin/python benchmarks/homedepot.py --variants omnisage_multi --steps 100
  .venv/bin/python benchmarks/homedepot.py --variants all     # the full ablation (~4 h here)
Prints a table and ends with one JSON line {"homedepot": {...}}.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
from absl import logging as absl_logging

VARIANTS = {
    "omnisage_single": {"tasks.q2query": 0, "tasks.compat": False},
    "omnisage_multi": {},
    "multi_no_logq": {"loss.logq": False},
    "multi_inbatch_only": {"loss.random_negatives": 0},
    "judged_negatives": {"loss.hard_negatives": 2},
    # Mined (ANCE): half the steps without, then `mine` (the checkpoint's and BM25's ranks
    # 10-100, never a positive), then the other half with 2 mined negatives per row.
    "mined_negatives": {"loss.hard_negatives": 2},
    "full_finetune": {"model.query.frozen_layers": 0},
    # The query's n-grams through the product tower's hash table (models/lexical_path.py).
    "lexical": {"model.query.lexical": True},
    # Both towers' title n-grams through one shared map, concatenated to the dense output: the
    # score is (1 - w) cos(dense) + w cos(n-grams), w learned (models/lexical_path.py).
    "lexical_channel": {"model.query.lexical": True, "model.lexical_dim": 128,
                        "model.lexical_weight": 0.5},
    # The same with 512-d n-gram vectors: a random projection's cosine error falls as 1/sqrt(dim),
    # and the lexical half is a projection of the n-gram bag (docs/omnisearchsage.md).
    "lexical_channel_wide": {"model.query.lexical": True, "model.text_dim": 512,
                             "model.lexical_dim": 512, "model.lexical_weight": 0.4},
    "all_together": {"model.query.lexical": True, "model.lexical_dim": 128,
                     "model.lexical_weight": 0.5, "loss.hard_negatives": 2,
                     "model.query.frozen_layers": 0},
}
MINED = ("mined_negatives", "all_together")   # variants trained in two halves around `mine`
DEFAULT_VARIANTS = ("omnisage_multi", "lexical_channel")
HYBRID_DEPTH = 100   # candidates each list gives the fusion
LEGACY_DIM = 256


def parse_args(argv=None):
  default_data = os.environ.get("OMNISAGE_DATASETS", os.path.join("..", "shared", "datasets"))
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default=default_data)
  p.add_argument("--workdir", default="runs/homedepot")
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                 help=f"comma-separated omnisage rows to train, of {', '.join(VARIANTS)}, or "
                 "'all' for the full ablation (bm25, minilm and hybrid always run)")
  p.add_argument("--steps", type=int, default=0, help="override train.steps (0: the config's)")
  p.add_argument("--config", default="", help="config argument, e.g. 'tiny' for tests")
  p.add_argument("--max-test-queries", type=int, default=0, help="0: all (tests use fewer)")
  p.add_argument("--skip-minilm", action="store_true", help="no MiniLM row and no legacy vectors")
  p.add_argument("--serve-dir", default="", help="where the best model's bundle and hybrid "
                 "index go (default <workdir>/serve)")
  p.add_argument("--no-serve", action="store_true", help="skip exporting them")
  return p.parse_args(argv)


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True).encode() if not isinstance(part, bytes) else part)
  return h.hexdigest()[:16]


def minilm_embeddings(texts: list[str], cache_dir: str, name: str) -> np.ndarray:
  """MiniLM vectors of `texts`, cached on disk by checkpoint + texts (the encode is minutes)."""
  from omnisage.baselines.text_encoder import SentenceEncoder, minilm_dir
  checkpoint = minilm_dir()
  with open(os.path.join(checkpoint, "model.safetensors"), "rb") as f:
    weights = hashlib.sha256(f.read()).digest()
  path = os.path.join(cache_dir, f"minilm_{name}_{_digest(weights, texts)}.npy")
  if os.path.exists(path):
    return np.load(path)
  t0 = time.time()
  vectors = SentenceEncoder(checkpoint).encode(texts)
  print(f"  MiniLM embedded {len(texts)} {name} in {time.time() - t0:.0f} s", flush=True)
  os.makedirs(cache_dir, exist_ok=True)
  np.save(path + ".tmp.npy", vectors)
  os.replace(path + ".tmp.npy", path)
  return vectors


def pca_rotation(x: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
  """The top-`dim` right singular vectors of x (uncentred, so inner products are what is kept)
  and the share of the squared norm they keep."""
  _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
  return vt[:dim].T.astype(np.float32), float((s[:dim] ** 2).sum() / (s ** 2).sum())


def evaluate_dense(queries: np.ndarray, corpus: np.ndarray, positives: list[list[int]]) -> dict:
  from omnisage.train.evaluators.corpus import corpus_metrics
  return corpus_metrics(lambda rows: queries[rows] @ corpus.T, positives)


def hybrid_lists(dense_q: np.ndarray, corpus: np.ndarray, bm25, texts: list[str],
                 depth: int = HYBRID_DEPTH) -> tuple[tuple, tuple]:
  """The two top-`depth` lists ((scores, rows) each, [n, depth]) that hybrid search fuses."""
  scores = dense_q @ corpus.T
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
  dense = (np.take_along_axis(scores, rows, axis=1), rows)
  return dense, bm25.search(texts, depth)


def evaluate_hybrid(dense: tuple, lexical: tuple, positives: list, size: int,
                    weight: float) -> dict:
  """Full-corpus metrics of the fused lists: items neither list returned score -inf, which
  corpus_metrics ranks last (never a hit)."""
  from omnisage.serving.index import hybrid
  from omnisage.train.evaluators.corpus import corpus_metrics
  fused_s, fused_r = hybrid.fuse(dense, lexical, 2 * HYBRID_DEPTH, "weighted", weight)

  def block(rows):
    out = np.full((len(rows), size), -np.inf)
    for i, r in enumerate(rows):
      keep = fused_r[r] >= 0
      out[i, fused_r[r][keep]] = fused_s[r][keep]
    return out
  return corpus_metrics(block, positives)


def export_for_serving(config, workdir: str, prepared: str, out: str, weight: float,
                       tuned_on: dict) -> dict:
  """The selected checkpoint's bundle, products and queries embedded and indexed (dense + BM25),
  the validation-tuned fusion weight stored with the index: `make serve-homedepot` serves it."""
  from omnisage.serving.index.embed import embed_entities
  from omnisage.serving.index.scann_index import build_index, set_fusion
  from omnisage.serving.omnisearchsage.export import export_bundle
  bundle, embeddings, index = (os.path.join(out, name) for name in ("bundle", "embeddings",
                                                                     "index"))
  exported = export_bundle(config, workdir, bundle)
  for kind in ("products", "queries"):
    embed_entities(bundle, os.path.join(prepared, "entities", f"{kind}.parquet"), embeddings)
  build_index(embeddings, index)
  fusion = set_fusion(os.path.join(index, "products"), "weighted", weight, tuned_on)
  print(f"  serving bundle + hybrid index in {out} (make serve-homedepot)", flush=True)
  return {"dir": out, "step": exported["step"], "fusion": fusion}


def train_with_mining(config, workdir: str, keep_judged: bool) -> dict:
  """Half of train.steps without hard negatives, `mine` from that checkpoint (model and BM25)
  into the run's own table directory (beside a copy of the judged table when the variant keeps
  it: all_together), then the rest with them. Train seconds add up both halves."""
  import ml_collections

  from omnisage.data.omnisearchsage.hard_negatives import table_dir
  from omnisage.train.omnisearchsage.mine import mine_hard_negatives
  from omnisage.train.omnisearchsage.trainer import train_and_evaluate
  total, k = int(config.train.steps), int(config.loss.hard_negatives)
  own = os.path.join(workdir, "hard_negatives")
  os.makedirs(own, exist_ok=True)
  if keep_judged:
    judged = os.path.join(table_dir(config.data.prepared_dir), "q2product.judged.parquet")
    if os.path.exists(judged):
      shutil.copy(judged, own)
  first = ml_collections.ConfigDict(config.to_dict())
  first.train.steps, first.loss.hard_negatives = total // 2, 0
  half = train_and_evaluate(first, workdir)
  config.data.hard_negatives_dir = own
  config.mine.sources, config.mine.tasks = ("model", "bm25"), ("q2product",)
  mined = mine_hard_negatives(config, workdir)
  config.loss.hard_negatives = k
  rest = train_and_evaluate(config, workdir)
  rest["train_seconds"] = round(half["train_seconds"] + rest["train_seconds"], 2)
  rest["mined"] = mined["tables"]
  return rest


def apply_overrides(config, overrides: dict):
  for dotted, value in overrides.items():
    node = config
    *path, leaf = dotted.split(".")
    for key in path:
      node = node[key]
    node[leaf] = value
  return config


def configure_logging():
  """The trainer's progress lines at INFO on stderr (as launch.py logs them); bm25s, Orbax and absl
  chatter only at WARNING and above. launch.py is not a package, so this is not imported from it."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("omnisage")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


def main(argv=None) -> dict:
  args = parse_args(argv)
  configure_logging()
  from configs import omnisage_homedepot
  from omnisage.baselines.bm25 import BM25Index
  from omnisage.data.omnisearchsage.prepare import prepare
  from omnisage.data.sources import homedepot
  from omnisage.train.checkpoint import select_checkpoint
  from omnisage.train.evaluators.corpus import corpus_metrics
  from omnisage.train.omnisearchsage.towers import TrainedTowers
  from omnisage.train.omnisearchsage.trainer import train_and_evaluate

  t_start = time.time()
  hd = homedepot.load(os.path.join(args.datasets, "homedepot-search-relevance"))
  product_ids = hd.products["product_id"].to_pylist()
  titles = hd.products["title"].to_pylist()
  row_of = {p: i for i, p in enumerate(product_ids)}
  splits = {}
  for name, test in (("test", True), ("validation", False)):
    pos = hd.positives(test=test)
    qs = sorted(q for q in pos if test or homedepot.is_validation_query(q))
    if args.max_test_queries:
      qs = qs[:args.max_test_queries]
    splits[name] = (qs, [sorted(row_of[p] for p in pos[q]) for q in qs])
  print(f"Home Depot: {len(titles)} products, {len(splits['test'][0])} test queries, "
        f"{len(splits['validation'][0])} validation queries; bad rows {dict(hd.bad.counts)}")
  results, timings = {}, {}

  t0 = time.time()
  bm25 = BM25Index(titles)
  for split, (qs, pos) in splits.items():
    results.setdefault("bm25", {})[split] = corpus_metrics(
        lambda rows, qs=qs: bm25.scores([qs[i] for i in rows]), pos)
  timings["bm25"] = time.time() - t0

  legacy, legacy_energy = None, None
  if not args.skip_minilm:
    t0 = time.time()
    cache = os.path.join(args.workdir, "cache")
    title_vecs = minilm_embeddings(titles, cache, "titles")
    for split, (qs, pos) in splits.items():
      q_vecs = minilm_embeddings(qs, cache, f"{split}_queries")
      results.setdefault("minilm", {})[split] = evaluate_dense(q_vecs, title_vecs, pos)
    timings["minilm"] = time.time() - t0
    rotation, legacy_energy = pca_rotation(title_vecs, LEGACY_DIM)
    legacy = title_vecs @ rotation
    rotation_path = os.path.join(cache, "legacy_rotation.npy")
    np.save(rotation_path, rotation)

  raw_dir = os.path.join(args.workdir, "raw")
  prepared = os.path.join(args.workdir, "prepared")
  world = homedepot.to_raw_tables(hd, raw_dir, itemsage=legacy)
  base = omnisage_homedepot.get_config(args.config or None)
  base.data.raw_dir, base.data.prepared_dir = raw_dir, prepared
  t0 = time.time()
  prep = prepare(base, raw_dir, prepared)
  timings["prepare"] = time.time() - t0
  print(f"  prepared in {timings['prepare']:.0f} s: pairs {prep['pairs']}", flush=True)

  dense_queries, dense_corpus, runs = {}, {}, {}
  variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",")
                                                              if v]
  for variant in variants:
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    config = apply_overrides(omnisage_homedepot.get_config(args.config or None), VARIANTS[variant])
    config.data.raw_dir, config.data.prepared_dir = raw_dir, prepared
    if legacy is None:
      config.tasks.compat = False
    else:
      config.model.query.projection_init = rotation_path
    if args.steps:
      config.train.steps = args.steps
    workdir = os.path.join(args.workdir, variant)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"  training {variant} ({config.train.steps} steps)...", flush=True)
    if variant in MINED:
      summary = train_with_mining(config, workdir, keep_judged=variant == "all_together")
    else:
      summary = train_and_evaluate(config, workdir)
    # Model selection on the VALIDATION queries: every kept checkpoint is scored on them and the
    # best one (ties: the later) is the one measured on test.
    towers = TrainedTowers(config, workdir)
    val_qs, val_pos = splits["validation"]
    by_step = {}
    for step in towers.steps():
      towers.restore(step)
      by_step[step] = evaluate_dense(towers.query_texts(val_qs), towers.entities("products"),
                                     val_pos)["recall@10"]
    best = max(by_step, key=lambda s: (by_step[s], s))
    towers.restore(best)
    # Recorded in the workdir: `launch.py eval` and `export` of it use this checkpoint.
    select_checkpoint(workdir, best, metric="validation recall@10", value=by_step[best])
    corpus = towers.entities("products")
    for split, (qs, pos) in splits.items():
      results.setdefault(variant, {})[split] = evaluate_dense(towers.query_texts(qs), corpus, pos)
    results[variant]["selection"] = {"validation_recall@10_by_step": by_step,
                                     "selected_step": best}
    dense_queries[variant] = {split: towers.query_texts(qs) for split, (qs, _) in splits.items()}
    dense_corpus[variant] = corpus
    runs[variant] = (config, workdir)
    timings[variant] = summary["train_seconds"]
    results[variant]["train"] = {k: summary[k] for k in ("steps", "train_seconds",
                                                          "examples_per_second", "final_loss")}
    if "mined" in summary:
      results[variant]["train"]["mined"] = {t: {k: m[k] for k in ("queries", "negatives",
                                                                  "by_source")}
                                            for t, m in summary["mined"].items()}
    print(f"  {variant}: test recall@10 {results[variant]['test']['recall@10']:.4f} "
          f"({summary['train_seconds']:.0f} s)", flush=True)

  # The best omnisage row on validation, then hybrid = BM25 + it, the weight tuned on validation.
  trained = [v for v in dense_queries]
  best_variant = max(trained, key=lambda v: results[v]["validation"]["recall@10"]) \
      if trained else None
  if best_variant is not None:
    from omnisage.serving.index import hybrid
    t0 = time.time()
    lists = {split: hybrid_lists(dense_queries[best_variant][split], dense_corpus[best_variant],
                                 bm25, qs) for split, (qs, _) in splits.items()}
    weight, by_weight = hybrid.tune_weight(*lists["validation"], splits["validation"][1])
    results["hybrid"] = {split: evaluate_hybrid(*lists[split], pos, len(titles), weight)
                         for split, (_, pos) in splits.items()}
    results["hybrid"]["fusion"] = {"of": ["bm25", best_variant], "method": "weighted",
                                   "weight": weight, "validation_recall@10_by_weight": by_weight}
    timings["hybrid"] = time.time() - t0
    if not args.no_serve:
      t0 = time.time()
      results["hybrid"]["serve"] = export_for_serving(
          *runs[best_variant], prepared, args.serve_dir or os.path.join(args.workdir, "serve"),
          weight, {"variant": best_variant, "validation_queries": len(splits["validation"][0]),
                   "validation_recall@10": by_weight[weight]})
      timings["serve_export"] = time.time() - t0

  print("\nHome Depot, test queries (README protocol); validation = held-out training queries")
  print(f"  {'method':<20} {'recall@10':>9} {'pair_recall@10':>14} {'val recall@10':>13} "
        f"{'train s':>8}")
  for method, r in results.items():
    train_s = r.get("train", {}).get("train_seconds")
    print(f"  {method:<20} {r['test']['recall@10']:>9.4f} {r['test']['pair_recall@10']:>14.4f} "
          f"{r['validation']['recall@10']:>13.4f} "
          f"{'-' if train_s is None else f'{train_s:.0f}':>8}")
  bm25_r = results["bm25"]["test"]["recall@10"]
  methods = {name: {"recall@10": r["test"]["recall@10"],
                    "pair_recall@10": r["test"]["pair_recall@10"],
                    "validation_recall@10": r["validation"]["recall@10"],
                    "train_seconds": r.get("train", {}).get("train_seconds")}
             for name, r in results.items()}
  if best_variant is not None:
    methods["omnisage"] = {**methods[best_variant], "variant": best_variant}
  out = {"homedepot": {
      "methods": methods,
      "results": results, "seconds": {k: round(v, 1) for k, v in timings.items()},
      "total_seconds": round(time.time() - t_start, 1), "world": world,
      "legacy_pca_energy": legacy_energy, "bad_rows": hd.bad.report()["by_reason"],
      "target": {"recall@10": 0.52, "bm25": bm25_r,
                 "multi_task": results.get("omnisage_multi", {}).get("test", {}).get("recall@10"),
                 "lift_over_bm25": (results["omnisage_multi"]["test"]["recall@10"] / bm25_r - 1
                                    if "omnisage_multi" in results else None)}}}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
