"""Home-feed two-tower (SPEC §3) vs popularity, item-kNN and EASE on the per-user protocol.

Protocol (omnisage/data/user_split.py, omnisage/train/evaluators/user_retrieval.py): each user's
last 20% of ratings (at least 1) are the test items, everything before is history; full ranking
over every rated movie, history excluded; Recall@10/50/100 and NDCG@10 with standard errors. The
same run scores the baselines of benchmarks/user_protocol_baselines.py on the same users.

Choices are made on VALIDATION only (the same cut inside each history): the two-tower variants of
`--encoders` (time-decay pooling, self-attention over the history) are trained on the validation
histories with the validation metrics every `--eval-every` steps, and the (variant, epochs) with
the best validation Recall@50 wins; EASE's lambda is chosen the same way. The winner is trained
again on the full histories (same schedule in epochs: the test histories hold more examples) and
scored on TEST once.

Usage:
  .venv/bin/python benchmarks/twotower_movielens.py \
      --movielens ../shared/datasets/movielens-latest-small [--encoders pool,attention]
Prints the table, then ONE JSON line {"twotower": {"methods": {"two_tower": {...}, ...}}}.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `python benchmarks/twotower_movielens.py` from anywhere
  sys.path.insert(0, ROOT)

KS = ("recall@10", "recall@50", "recall@100", "ndcg@10")


def parse_args(argv=None):
  root = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--movielens", default=os.path.join(root, "movielens-latest-small"),
                 help="a MovieLens-format folder (ratings.csv, movies.csv)")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "twotower_bench"))
  p.add_argument("--encoders", default="pool",
                 help="user-tower variants tried on validation (model.user_encoder)")
  p.add_argument("--steps", type=int, default=0, help="validation-run steps (0: the config's)")
  p.add_argument("--eval-every", type=int, default=0, help="0: the config's train.eval_every")
  p.add_argument("--test-fraction", type=float, default=0.2)
  p.add_argument("--recent-days", type=float, default=90.0)
  p.add_argument("--ease-lambdas", default="50,200,500,2000")
  p.add_argument("--max-users", type=int, default=0, help="0: all (tests use fewer)")
  p.add_argument("--tiny", action="store_true", help="the config's tiny model (tests)")
  return p.parse_args(argv)


def per_user_config(args, encoder: str, stage: str):
  from configs import twotower_movielens
  config = twotower_movielens.get_config("per_user_tiny" if args.tiny else "per_user")
  config.data.movielens_dir = args.movielens
  config.data.stage = stage
  config.data.test_fraction = args.test_fraction
  config.model.user_encoder = encoder
  if args.steps:
    config.train.steps = args.steps
  if args.eval_every:
    config.train.eval_every = args.eval_every
  return config


def train_stage(config, workdir: str, ml, make_evaluate=None) -> tuple[dict, dict]:
  """Prepares `config`'s stage (data.stage) into a fresh workdir and trains it: (prepare's
  summary, train's summary). make_evaluate(prepared, catalogue) -> the trainer's hook
  evaluate(statics, params, step) (None: no hook); benchmarks/pinnersage.py uses it too."""
  from omnisage.data.twotower import examples as mlx
  from omnisage.train.twotower import trainer
  shutil.rmtree(workdir, ignore_errors=True)   # a stale checkpoint would be resumed
  prepared = os.path.join(workdir, "prepared")
  config.data.prepared_dir = prepared
  meta = mlx.prepare_movielens(ml, config.data, prepared)
  evaluate = None if make_evaluate is None else make_evaluate(prepared,
                                                              mlx.Catalogue.load(prepared))
  return meta, trainer.train(config, workdir, evaluate=evaluate)


def same_epochs(config, step: int, examples: int, split) -> float:
  """Sets a test-stage `config` to train as many epochs as `step` steps of the validation run
  (`examples` training examples) did, on `split`'s histories, under the validation run's
  learning-rate schedule (train.steps' epochs); returns those epochs."""
  batch = int(config.train.batch_size)
  epochs = step * batch / examples
  schedule_epochs = int(config.train.steps) * batch / examples
  per_epoch = sum(len(h) for h in split.history.values()) / batch
  config.train.schedule_steps = max(1, round(schedule_epochs * per_epoch))
  config.train.steps = max(1, round(epochs * per_epoch))
  return epochs


def train_and_score(config, workdir: str, ml, candidates_of, evaluate_at=None) -> dict:
  """Prepares `config`'s stage into a fresh workdir, trains, and scores with the protocol.
  evaluate_at None: every train.eval_every steps (validation curves); a step: only there."""
  from omnisage.train.twotower.protocol import ProtocolEvaluator
  curve = {}

  def make_evaluate(prepared, catalogue):
    evaluator = ProtocolEvaluator(prepared, catalogue, candidates_of(catalogue))

    def evaluate(statics, params, step):
      if step == 0 or (evaluate_at is not None and step != evaluate_at):
        return {}   # the untrained model is no candidate; test is scored at one step only
      curve[step] = evaluator.run(statics, params)
      return {k: curve[step][k] for k in KS}
    return evaluate

  if evaluate_at is not None:   # the chosen step is the last one: one evaluation, at the end
    config.train.eval_every = 0
  meta, summary = train_stage(config, workdir, ml, make_evaluate)
  return {"examples": meta["train_examples"], "curve": curve, "train": summary}


def main(argv=None) -> dict:
  args = parse_args(argv)
  import pyarrow.compute as pc

  from benchmarks.user_protocol_baselines import evaluate_all
  from omnisage.data.sources import movielens
  from omnisage.data.user_split import per_user_split, validation_split
  t0 = time.time()
  ml = movielens.load(args.movielens)
  if args.max_users:
    first = np.unique(ml.ratings["user"].to_numpy())[:args.max_users]
    ml = dataclasses.replace(ml, ratings=ml.ratings.filter(pc.is_in(ml.ratings["user"],
                                                                      value_set=pc.cast(
                                                                          first, "int32"))))
  r = ml.ratings
  users, items, ts = (r[c].to_numpy() for c in ("user", "movie", "timestamp"))
  # The ranked items of every method: every movie that anyone rated (the baselines' columns).
  column = {int(m): j for j, m in enumerate(np.unique(items))}
  movies = np.array(sorted(column, key=column.get))

  def candidates_of(catalogue):
    return np.array([catalogue.index_of[str(int(m))] for m in movies], np.int64)

  split = per_user_split(users, items, ts, args.test_fraction)
  val = validation_split(split, args.test_fraction)
  lam_grid = [float(v) for v in args.ease_lambdas.split(",")]
  t_base = time.time()
  validation = evaluate_all(val, column, val.history_times, args, lam_grid)
  test = evaluate_all(split, column, split.history_times, args, lam_grid,
                      lam=validation["ease"]["lambda"])
  base_seconds = time.time() - t_base

  # Two-tower: every variant on validation, the best (variant, step) by validation Recall@50.
  t_tt = time.time()
  runs = {}
  for encoder in [e for e in args.encoders.split(",") if e]:
    config = per_user_config(args, encoder, "validation")
    runs[encoder] = train_and_score(config, os.path.join(args.workdir, f"val_{encoder}"), ml,
                                    candidates_of)
    for step, m in runs[encoder]["curve"].items():
      print(f"  validation {encoder:<10} step {step:>5}: recall@50 {m['recall@50']:.4f} "
            f"ndcg@10 {m['ndcg@10']:.4f}", flush=True)
  encoder, step = max(((e, s) for e, run in runs.items() for s in run["curve"]),
                      key=lambda es: runs[es[0]]["curve"][es[1]]["recall@50"])
  chosen_val = runs[encoder]["curve"][step]
  config = per_user_config(args, encoder, "test")
  # The same number of epochs on the test stage's histories (more examples than validation's).
  epochs = same_epochs(config, step, runs[encoder]["examples"], split)
  final = train_and_score(config, os.path.join(args.workdir, "test"), ml, candidates_of,
                          evaluate_at=int(config.train.steps))
  tt_seconds = time.time() - t_tt
  test["two_tower"] = final["curve"][int(config.train.steps)]
  validation["two_tower"] = chosen_val

  names = ("two_tower", "popularity", "popularity_recent", "item_knn", "ease")
  print(f"\nper-user temporal protocol on {args.movielens}: {len(split.test)} users "
        f"({split.skipped['too_few_engagements']} skipped), {len(column)} movies; "
        f"two-tower: {encoder}, {epochs:.1f} epochs chosen on validation")
  print(f"  {'method':<18} " + " ".join(f"{k:>16}" for k in KS) + f" {'val recall@50':>14}")
  for name in names:
    m = test[name]
    print(f"  {name:<18} " + " ".join(f"{m[k]:>8.4f} ±{m[k + '_se']:.4f}" for k in KS)
          + f" {validation[name]['recall@50']:>14.4f}")
  for name in names:   # a non-finite figure is never reported
    if not all(math.isfinite(test[name][k]) for k in KS):
      raise FloatingPointError(f"{name}: non-finite metrics {test[name]}")
  out = {"twotower": {
      "dataset": args.movielens, "users": len(split.test), "movies": len(column),
      "skipped": split.skipped, "test_fraction": args.test_fraction,
      "methods": {name: {**{k: round(test[name][k], 4) for k in KS},
                         **{f"{k}_se": round(test[name][f"{k}_se"], 4) for k in KS},
                         "validation_recall@50": round(validation[name]["recall@50"], 4),
                         **({"lambda": test[name]["lambda"]} if "lambda" in test[name] else {})}
                  for name in names},
      "two_tower": {"encoder": encoder, "epochs": round(epochs, 2),
                    "test_steps": int(config.train.steps),
                    "batch_size": int(config.train.batch_size),
                    "random_negatives": int(config.loss.random_negatives),
                    "validation": {e: {str(s): {k: round(m[k], 4) for k in KS}
                                       for s, m in run["curve"].items()}
                                   for e, run in runs.items()},
                    "train_seconds": {**{f"val_{e}": run["train"]["train_seconds"]
                                         for e, run in runs.items()},
                                      "test": final["train"]["train_seconds"]}},
      "seconds": {"baselines": round(base_seconds, 1), "two_tower": round(tt_seconds, 1),
                  "total": round(time.time() - t0, 1)}}}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
