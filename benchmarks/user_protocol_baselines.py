"""The non-learned recommenders on the per-user temporal protocol (any MovieLens-format dataset).

Protocol (omnisage/data/user_split.py, omnisage/train/evaluators/user_retrieval.py): each user's
last 20% of ratings (at least 1) are the test items, everything before is history; full ranking
over every rated movie, history excluded; Recall@10/50/100 and NDCG@10 with standard errors.
Choices (EASE's lambda) are made on the validation split carved the same way out of the
histories; test is scored once with the chosen value.

Methods:
  popularity         ratings in the training histories, all time
  popularity_recent  ratings in the last `--recent-days` days before each history's end (ties:
                     all-time count)
  item_knn           cosine similarity of the movies' user sets, all neighbours (Sarwar 2001)
  ease               EASE (Steck 2019), lambda chosen on validation from --ease-lambdas

Usage:
  .venv/bin/python benchmarks/user_protocol_baselines.py [--movielens DIR]
Prints a table and ends with one JSON line {"user_protocol": {"methods": {...}}}.
"""

import argparse
import json
import os
import time

import numpy as np
import scipy.sparse as sp


def parse_args(argv=None):
  root = os.environ.get("OMNISAGE_DATASETS", os.path.join("..", "shared", "datasets"))
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--movielens", default=os.path.join(root, "movielens-latest-small"))
  p.add_argument("--test-fraction", type=float, default=0.2)
  p.add_argument("--recent-days", type=float, default=90.0)
  p.add_argument("--ease-lambdas", default="50,200,500,2000")
  p.add_argument("--max-users", type=int, default=0, help="0: all (tests use fewer)")
  return p.parse_args(argv)


def history_matrix(split, users: list, column: dict) -> sp.csr_matrix:
  rows, cols = [], []
  for r, u in enumerate(users):
    items = [column[i] for i in split.history[u] if i in column]
    rows += [r] * len(items)
    cols += items
  return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(column)))


def evaluate_all(split, column: dict, times: dict, args, lam_grid, lam=None) -> dict:
  """{method: metrics} on `split` (its histories train every method, its test items score it)."""
  from omnisage.baselines.ease import ease_weights
  from omnisage.baselines.popularity import item_knn_weights
  from omnisage.train.evaluators.user_retrieval import user_metrics
  users = split.users
  x = history_matrix(split, users, column)
  seen = [[column[i] for i in split.history[u] if i in column] for u in users]
  positives = [[column[i] for i in split.test[u] if i in column] for u in users]
  keep = [i for i, p in enumerate(positives) if p]
  x, seen, positives = x[keep], [seen[i] for i in keep], [positives[i] for i in keep]
  counts = np.asarray(x.sum(axis=0)).ravel()
  out = {}
  out["popularity"] = user_metrics(np.broadcast_to(counts, x.shape), seen, positives)
  # Recent: history rows within --recent-days of the latest history timestamp.
  latest = max(int(t.max()) for u, t in times.items() if len(t))
  recent = np.zeros(len(column))
  for u in users:
    for item, t in zip(split.history[u], times[u]):
      if item in column and t >= latest - args.recent_days * 86400:
        recent[column[item]] += 1
  out["popularity_recent"] = user_metrics(
      np.broadcast_to(recent + counts / (counts.max() + 1.0), x.shape), seen, positives)
  out["item_knn"] = user_metrics(np.asarray(x @ item_knn_weights(x)), seen, positives)
  chosen = {}
  for value in ([lam] if lam is not None else lam_grid):
    chosen[value] = user_metrics(np.asarray(x @ ease_weights(x, value)), seen, positives)
  best = max(chosen, key=lambda v: chosen[v]["recall@50"])
  out["ease"] = {**chosen[best], "lambda": best,
                 "recall@50_by_lambda": {str(v): m["recall@50"] for v, m in chosen.items()}}
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  from omnisage.data.sources import movielens
  from omnisage.data.user_split import per_user_split, validation_split
  t0 = time.time()
  ml = movielens.load(args.movielens)
  r = ml.ratings
  users, items, ts = (r[c].to_numpy() for c in ("user", "movie", "timestamp"))
  if args.max_users:
    keep = np.isin(users, np.unique(users)[:args.max_users])
    users, items, ts = users[keep], items[keep], ts[keep]
  column = {int(m): j for j, m in enumerate(np.unique(items))}
  split = per_user_split(users, items, ts, args.test_fraction)
  val = validation_split(split, args.test_fraction)
  lam_grid = [float(v) for v in args.ease_lambdas.split(",")]
  validation = evaluate_all(val, column, val.history_times, args, lam_grid)
  test = evaluate_all(split, column, split.history_times, args, lam_grid,
                      lam=validation["ease"]["lambda"])
  ks = ("recall@10", "recall@50", "recall@100", "ndcg@10")
  print(f"per-user temporal protocol on {args.movielens}: {len(split.test)} users "
        f"({split.skipped['too_few_engagements']} skipped), {len(column)} movies")
  print(f"  {'method':<18} " + " ".join(f"{k:>16}" for k in ks) + f" {'val recall@50':>14}")
  for name, m in test.items():
    print(f"  {name:<18} " + " ".join(f"{m[k]:>8.4f} ±{m[k + '_se']:.4f}" for k in ks)
          + f" {validation[name]['recall@50']:>14.4f}")
  out = {"user_protocol": {
      "dataset": args.movielens, "users": len(split.test), "movies": len(column),
      "skipped": split.skipped, "test_fraction": args.test_fraction,
      "methods": {name: {**{k: m[k] for k in ks}, **{f"{k}_se": m[f"{k}_se"] for k in ks},
                         "validation_recall@50": validation[name]["recall@50"],
                         **({"lambda": m["lambda"]} if "lambda" in m else {})}
                  for name, m in test.items()},
      "seconds": round(time.time() - t0, 1)}}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
