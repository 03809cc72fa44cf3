"""Home-feed two-tower (SPEC §3) vs popularity and item-item co-occurrence on MovieLens.

Protocol (omnisage/train/evaluators/twotower.py): global time split at the 80% quantile of rating
times; every model sees pre-cut data only; for each user with ratings on both sides, all 9,742
movies are ranked with the user's pre-cut movies excluded; Recall@50 / Recall@100 against the
movies rated after the cut. All rows are measured in the same run on the same users.

Default: full ml-latest-small, batch 6000, configs/twotower_movielens.py's steps: prepare ~30 s,
training ~15-30 min on a shared 2-core CPU box (a few seconds per step), evaluation ~1 min.

Usage:
  python benchmarks/twotower_movielens.py --workdir=runs/twotower_bench [--steps=400]
Prints the table, then ONE JSON line.
"""

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "twotower_bench"))
  parser.add_argument("--movielens", default="", help="dataset folder (default: config's)")
  parser.add_argument("--steps", type=int, default=0, help="train steps (0: the config's)")
  parser.add_argument("--batch-size", type=int, default=0, help="0: the config's (6000)")
  parser.add_argument("--learning-rate", type=float, default=0.0, help="0: the config's")
  parser.add_argument("--fresh", action="store_true", help="delete old checkpoints first")
  args = parser.parse_args()

  import shutil

  from configs import twotower_movielens
  from omnisage.baselines import popularity
  from omnisage.data.twotower import examples as mlx
  from omnisage.data.twotower.prepare import prepare
  from omnisage.train.evaluators import twotower as twotower_eval
  from omnisage.train.twotower import trainer as twotower
  config = twotower_movielens.get_config()
  if args.movielens:
    config.data.movielens_dir = args.movielens
  if args.steps:
    config.train.steps = args.steps
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.learning_rate:
    config.train.learning_rate = args.learning_rate
  if args.fresh:
    shutil.rmtree(os.path.join(args.workdir, "checkpoints"), ignore_errors=True)

  prepared = prepare(config, args.workdir)
  print(json.dumps({"prepare": prepared}), flush=True)
  trained = twotower.train(config, args.workdir)
  print(json.dumps({"train": trained}), flush=True)
  t0 = time.time()
  model = twotower.evaluate(config, args.workdir)
  eval_seconds = time.time() - t0

  p = prepared["prepared_dir"]
  catalogue, users = mlx.Catalogue.load(p), mlx.load_eval_users(p)
  examples = mlx.load_examples(p)
  n, ks = len(users["seen"]), tuple(config.eval.ks)
  rows = {
      "popularity (last 90 days)": twotower_eval.recall(
          popularity.popularity_scores(catalogue, n, "window"), users, ks),
      "popularity (all pre-cut)": twotower_eval.recall(
          popularity.popularity_scores(catalogue, n, "total"), users, ks),
      "co-occurrence (counts)": twotower_eval.recall(popularity.cooccurrence_scores(
          examples["user"], examples["item"], users, catalogue.size), users, ks),
      "co-occurrence (cosine)": twotower_eval.recall(popularity.cooccurrence_scores(
          examples["user"], examples["item"], users, catalogue.size, cosine=True), users, ks),
      "two-tower (untrained)": model["untrained"],
      "two-tower": model["recall"],
  }
  print(f"\nMovieLens ml-latest-small, time split at {prepared['cut']}: {n} users, "
        f"{prepared['eval_positives']} post-cut positives, {catalogue.size} items; "
        f"{prepared['cold_start_eval_users_skipped']} cold-start users not evaluated")
  print(f"{'method':<28} " + " ".join(f"{'Recall@' + str(k):>11}" for k in ks))
  for name, r in rows.items():
    print(f"{name:<28} " + " ".join(f"{r[f'recall@{k}']:>11.4f}" for k in ks))
  print(f"train: {trained['steps']} steps x batch {config.train.batch_size} "
        f"({trained['epochs']} epochs) in {trained['train_seconds']} s, "
        f"{trained['examples_per_second']} examples/s")
  best_pop = max(rows["popularity (last 90 days)"]["recall@100"],
                 rows["popularity (all pre-cut)"]["recall@100"])
  summary = {"users": n, "items": catalogue.size, "cut": prepared["cut"],
             "recall": {name: {f"recall@{k}": round(r[f"recall@{k}"], 4) for k in ks}
                        for name, r in rows.items()},
             "two_tower_over_best_popularity@100": round(
                 model["recall"]["recall@100"] / max(best_pop, 1e-9), 3),
             "steps": trained["steps"], "batch_size": int(config.train.batch_size),
             "train_seconds": trained["train_seconds"],
             "examples_per_second": trained["examples_per_second"],
             "eval_seconds": round(eval_seconds, 1)}
  print(json.dumps({"twotower_movielens": summary}), flush=True)


if __name__ == "__main__":
  main()
