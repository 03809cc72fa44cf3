"""PinText on WANDS: kNN query -> class, leave-one-out precision@1, per embedding source.

SPEC §2's evaluation ("kNN query -> interest classification; the multitask model beat each
single-task model and unsupervised pretrained embeddings"), on the WANDS queries
(omnisage/data/sources/wands.py: 480 rows, 474 load, 6 have an empty class and are dropped and
reported). Each query's nearest OTHER query by cosine (exact brute-force search) predicts its
class. Sources, measured side by side in one run:
  multitask           PinText trained on homedepot + bestbuy + movielens (configs/pintext.py)
  homedepot|bestbuy|movielens   PinText trained on that task alone (same sizes and steps)
  random              the multitask dictionary at initialisation (same vocabulary, no training)
  minilm              off-the-shelf all-MiniLM-L6-v2 sentence embeddings (SentenceEncoder)
Coverage: the share of WANDS query word tokens in the model's vocabulary (MiniLM: the share of
its WordPiece tokens that are not [UNK]). `P@1 answ.` is over the queries whose class has another
member (a singleton class can never be predicted). Every PinText model goes through
prepare -> train -> export, and WANDS is embedded with the exported bundle.

--tune trains the multitask model for a small grid of (mu, rho, gamma) and reports the
VALIDATION Recall@10 (positive among 100 random catalogue items, mean over tasks); WANDS is not
looked at. Defaults take about 15 minutes on a shared 2-core CPU box.

Usage:
  .venv/bin/python benchmarks/pintext.py [--datasets ../shared/datasets] [--workdir runs/pintext]
  .venv/bin/python benchmarks/pintext.py --tune --steps 400
Prints a table and ends with one JSON line {"pintext": {...}}; bad input exits 2 with
{"pintext": {"error": ...}}.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("multitask", "homedepot", "bestbuy", "movielens")
GRID = [(0.1, 5, 1.0), (0.2, 5, 1.0), (0.4, 5, 1.0), (0.2, 10, 1.0), (0.2, 5, 0.0)]


def config_of(variant: str, args):
  from configs import pintext as pintext_config
  config = pintext_config.get_config(variant)
  config.data.datasets = args.datasets
  if args.steps:
    config.train.steps = args.steps
  return config


def fresh(workdir: str):
  """Drops a previous run's checkpoints and logs (never anything else in the workdir)."""
  for name in ("checkpoints", "tensorboard", "train_metrics.jsonl", "bundle"):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def run_pintext(variant: str, args, prepared: str | None = None, **loss) -> dict:
  """prepare (unless `prepared` is given) -> train -> export; returns the summaries."""
  from omnisage.data.pintext import pairs as pintext_pairs
  from omnisage.serving.pintext import export as pintext_export
  from omnisage.train.pintext import trainer as pintext
  config = config_of(variant, args)
  for key, value in loss.items():
    config.loss[key] = value
  workdir = os.path.join(args.workdir, variant)
  if prepared:
    config.data.prepared_dir = prepared
  else:
    pintext_pairs.prepare(config, workdir)
  fresh(workdir)
  trained = pintext.train(config, workdir)
  exported = pintext_export.export(config, workdir, os.path.join(workdir, "bundle"))
  return {"config": config, "workdir": workdir, "train": trained, "export": exported}


def tune(args) -> dict:
  from omnisage.data.pintext import pairs as pintext_pairs
  base = config_of("multitask", args)
  prepared = os.path.join(args.workdir, "multitask", "prepared")
  pintext_pairs.prepare(base, os.path.join(args.workdir, "multitask"))
  rows = []
  print(f"{'mu':>5} {'rho':>4} {'gamma':>6} {'val R@10':>9}  per task")
  for margin, negatives, radius in GRID:
    run = run_pintext("multitask", args, prepared, margin=margin, negatives=negatives,
                      radius=radius)
    val = run["train"]["validation"]
    rows.append({"mu": margin, "rho": negatives, "gamma": radius,
                 "val_recall@10": val["mean_recall@10"], "train_seconds":
                 run["train"]["train_seconds"],
                 "per_task": {t: val[t].get("recall@10") for t in base.tasks}})
    print(f"{margin:>5} {negatives:>4} {radius:>6} {val['mean_recall@10']:>9.4f}  "
          f"{rows[-1]['per_task']}", flush=True)
  best = max(rows, key=lambda r: r["val_recall@10"])
  return {"tune": rows, "best": best, "steps": base.train.steps}


def minilm_row(queries: list[str], classes: list[str]) -> dict:
  from omnisage.baselines.text_encoder import SentenceEncoder, minilm_dir
  from omnisage.train.evaluators.pintext import knn_loo_precision_at_1
  enc = SentenceEncoder(minilm_dir())
  t0 = time.time()
  vectors = enc.encode(queries)
  result = knn_loo_precision_at_1(vectors, classes)
  result.pop("nearest")
  pieces = [p for q in queries for p in enc.tokenizer.pieces(q)]
  known = sum(p != enc.tokenizer.unk_id for p in pieces)
  return {**result, "tokens": len(pieces), "known": known, "coverage": known / len(pieces),
          "encode_seconds": round(time.time() - t0, 2)}


def compare(args) -> dict:
  from omnisage.data.pintext import pairs as pintext_pairs
  from omnisage.data.workdir import prepared_dir_of
  from omnisage.models.pintext import TextEmbedder
  from omnisage.train.evaluators import pintext as pintext_eval
  from omnisage.train.pintext import trainer as pintext
  rows, train_seconds = {}, {}
  summaries = {}
  for variant in VARIANTS:
    run = run_pintext(variant, args)
    prepared = prepared_dir_of(run["config"], run["workdir"])
    embedder = TextEmbedder.load(run["export"]["bundle"])
    rows[variant] = pintext_eval.wands_eval(prepared, embedder)
    train_seconds[variant] = run["train"]["train_seconds"]
    summaries[variant] = {"validation": run["train"]["validation"],
                          "vocab": run["export"]["vocab_size"] - 1}
    if variant == "multitask":
      multitask = run
  # random: the multitask dictionary as initialised (same seed, same vocabulary)
  config = multitask["config"]
  prepared = prepared_dir_of(config, multitask["workdir"])
  _, vocab, _, untrained = pintext.latest_table(config, multitask["workdir"])
  rows["random"] = pintext_eval.wands_eval(prepared, TextEmbedder(vocab, untrained[:len(vocab)]))
  summaries["random"] = {"validation": pintext_eval.validation(config, prepared, untrained),
                         "vocab": len(vocab) - 1}
  queries, classes = pintext_pairs.read_wands(prepared)
  if not args.skip_minilm:
    rows["minilm"] = minilm_row(queries, classes)
  with open(os.path.join(prepared, "meta.json")) as f:
    meta = json.load(f)

  print(f"WANDS kNN query -> class, leave-one-out, exact search: {len(queries)} queries "
        f"({meta['bad_rows']['wands']} rows dropped: {meta['bad_rows_by_reason']['wands']}), "
        f"{len(set(classes))} classes")
  print(f"{'source':<10} {'P@1':>6} {'P@1 answ.':>10} {'coverage':>9} {'no-word q':>10} "
        f"{'val R@10':>9} {'train s':>8}")
  for name, r in rows.items():
    val = summaries.get(name, {}).get("validation", {}).get("mean_recall@10")
    print(f"{name:<10} {r['precision@1']:>6.3f} {r['precision@1_answerable']:>10.3f} "
          f"{r['coverage']:>9.3f} {str(r.get('texts_without_known_word', '-')):>10} "
          f"{'-' if val is None else f'{val:.3f}':>9} "
          f"{str(train_seconds.get(name, '-')):>8}")
  return {"wands": {"queries": len(queries), "classes": len(set(classes)),
                    "dropped_rows": meta["bad_rows"]["wands"], "answerable": rows["random"][
                        "answerable"]},
          "search": "exact", "loss": dict(config.loss), "steps": config.train.steps,
          "sources": rows, "train_seconds": train_seconds, "models": summaries}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--datasets", default=os.environ.get(
      "OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets")))
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "pintext"))
  p.add_argument("--steps", type=int, default=0, help="override train.steps (0: the config's)")
  p.add_argument("--tune", action="store_true", help="validation grid over mu, rho, gamma")
  p.add_argument("--skip-minilm", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    summary = tune(args) if args.tune else compare(args)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"pintext": {"error": str(error)}}))
    return 2
  print(json.dumps({"pintext": summary}, default=float))
  return 0


if __name__ == "__main__":
  sys.exit(main())
