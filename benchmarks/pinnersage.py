"""PinnerSage on MovieLens: next-period Recall@400 of user representations, as lifts over the
last engaged item (SPEC §4; the paper reports +88% recall for Ward + medoid + lambda 0.01 and +14%
for a decayed average).

Protocols (both run by default; the same code, different cuts):
  global    movielens.time_split(ratings, 0.8): one cut for every user; history = the user's
            ratings in the 90 days before the cut; next period = the user's ratings after it.
            Only users with both count, and MovieLens users are bursty, so few qualify (~14).
  per_user  movielens.time_split applied to EACH user's timestamps (0.8): the cut, 90-day history
            and next period are the user's own (~600 users). Item embeddings still see only
            ratings before each rater's own cut, so no target leaks into them, but one user's
            train ratings may be later in calendar time than another's targets.
Validation (alpha tuning): the same split applied again to the training side only (the global
train rows, or each user's pre-cut rows); embeddings for it are rebuilt from that side alone. The
test period is never looked at before alpha is fixed.

Item embeddings (default): a cheap collaborative embedding from the TRAINING side only: the
item-item co-occurrence of users' rating sets (movies rated by >= --min-count users), positive
PMI, a rank-64 randomized SVD (U sqrt(S)), rows L2-normalised. --item-embeddings takes any
embeddings instead (a Parquet file with id = movie id, embedding; or an embed.py directory).
Movies without an embedding are counted and left out of histories and targets.

Candidates: exact inner-product top-k over all embedded movies, the user's training movies
excluded (for every method alike); Recall@400 = |candidates ∩ next-period movies| /
min(|next-period movies|, 400), averaged over users. Methods (all retrieve 400):
  last          the last engaged item
  decayed_avg   sum_i exp(-0.01 age_days_i) P_i
  kmeans5       k-means (k = min(5, n), k-means++ init, 25 Lloyd steps): 3 centroids sampled by
                importance (lambda 0.01), merged as PinnerSage does
  ward_centroid Ward (alpha tuned) + cluster centroids, lambda 0.01
  ward_medoid   Ward + medoids, lambda in {0, 0.01, 0.1} (the paper's method: lambda 0.01)
Sampled methods are averaged over --seeds seeds (fixed: 0..seeds-1).

Default sizes finish in a few minutes on a 2-core box (the Ward clustering of ~600 users for each
alpha of the grid dominates).

Usage:
  .venv/bin/python benchmarks/pinnersage.py [--datasets ../shared/datasets] [--protocol both]
Prints the tables and ends with one JSON line {"pinnersage": {...}}.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from omnisage.data.sources import movielens
from omnisage.models import pinnersage as model
from omnisage.serving.pinnersage import batch as ps_batch
from omnisage.serving.pinnersage import service as ps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = model.DAY_S
ALPHAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8)
LAMBDAS = (0.0, 0.01, 0.1)


def ppmi_svd(users, movies, dim: int, min_count: int, seed: int) -> ps_batch.Items:
  """Rank-`dim` SVD of the positive PMI of item-item co-occurrence in users' rating sets."""
  ids, counts = np.unique(movies, return_counts=True)
  ids = ids[counts >= min_count]
  col = {m: i for i, m in enumerate(ids)}
  uniq_users = {u: i for i, u in enumerate(np.unique(users))}
  x = np.zeros((len(uniq_users), len(ids)), np.float32)
  for u, m in zip(users, movies):
    if m in col:
      x[uniq_users[u], col[m]] = 1.0
  co = x.T @ x
  np.fill_diagonal(co, 0.0)
  total = co.sum()
  marg = co.sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(co * total / np.outer(marg, marg))
  ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0).astype(np.float32)
  del co, pmi
  rng = np.random.default_rng(seed)
  q = ppmi @ rng.standard_normal((len(ids), dim + 16)).astype(np.float32)
  for _ in range(3):   # power iterations (ppmi is symmetric)
    q, _ = np.linalg.qr(ppmi @ q)
  q, _ = np.linalg.qr(q)
  u_small, s, _ = np.linalg.svd(q.T @ ppmi, full_matrices=False)
  emb = (q @ u_small[:, :dim]) * np.sqrt(s[:dim])[None, :]
  emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return ps_batch.Items.create([str(m) for m in ids], emb)


def kmeans(x: np.ndarray, k: int, rng, steps: int = 25) -> np.ndarray:
  """Labels of Lloyd's k-means with k-means++ seeding."""
  centres = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
    centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
  c = np.asarray(centres)
  for _ in range(steps):
    labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    c = np.asarray([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
  return labels


class Task:
  """One evaluation: embeddings, each user's history (rows, times, now), targets, exclusions."""

  def __init__(self, items, histories, nows, targets, exclude, left_out):
    self.items, self.histories, self.nows = items, histories, nows
    self.targets, self.exclude, self.left_out = targets, exclude, left_out
    self.users = sorted(histories)


def make_task(ratings, train_mask, cut_of, args, items=None) -> Task:
  """train_mask: rows on the training side; cut_of[u]: user u's cut (now)."""
  users, movies, ts = ratings
  if items is None:
    items = ppmi_svd(users[train_mask], movies[train_mask], args.dim, args.min_count, args.seed)
  rows = np.asarray([items.row.get(str(m), -1) for m in movies], np.int64)
  histories, nows, targets, exclude = {}, {}, {}, {}
  left = {"train_rows_without_embedding": int(((rows < 0) & train_mask).sum()),
          "target_rows_without_embedding": 0, "users_without_history": 0,
          "users_without_targets": 0}
  order = np.lexsort((movies, ts, users))
  for u in np.unique(users):
    sel = order[users[order] == u]
    if u not in cut_of:
      continue
    now = cut_of[u]
    train = sel[train_mask[sel] & (rows[sel] >= 0)]
    window = train[ts[train] >= now - args.window_days * DAY]
    test = sel[~train_mask[sel] & (ts[sel] >= now)]
    if args.horizon_days:
      test = test[ts[test] < now + args.horizon_days * DAY]
    left["target_rows_without_embedding"] += int((rows[test] < 0).sum())
    test = test[rows[test] >= 0]
    if not len(window):
      left["users_without_history"] += 1
      continue
    if not len(test):
      left["users_without_targets"] += 1
      continue
    histories[u] = (rows[window], ts[window])
    nows[u] = now
    targets[u] = set(rows[test].tolist())
    exclude[u] = set(rows[train].tolist())
  return Task(items, histories, nows, targets, exclude, left)


def search_fn(items):
  def search(queries, k):
    scores = np.asarray(queries, np.float32) @ items.vectors.T
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    return [list(r) for r in np.take_along_axis(top, order, 1)]
  return search


def recall(task, queries_of, budget) -> float:
  """Mean Recall@budget; queries_of(u) -> [q, D] query vectors of user u (merged round robin)."""
  search = search_fn(task.items)
  per_user = []
  for u in task.users:
    got = ps.candidates(queries_of(u), search, budget, task.exclude[u])
    per_user.append(len(task.targets[u] & set(got)) / min(len(task.targets[u]), budget))
  return float(np.mean(per_user))


def ward(task, alpha, lam):
  """user -> UserState of every history, importances measured from the user's own cut."""
  t0 = time.perf_counter()
  found = model.cluster_histories(
      task.items.vectors, [task.histories[u][0] for u in task.users],
      [(task.nows[u] - task.histories[u][1]) / DAY for u in task.users], alpha, lam)
  seconds = time.perf_counter() - t0
  states = {u: ps_batch.UserState(*task.histories[u], c, task.nows[u])
            for u, c in zip(task.users, found)}
  return states, seconds


def evaluate(task, alpha, args, methods=None) -> tuple[dict, dict]:
  """{method: recall}, {timings} for one task."""
  v = task.items.vectors
  out, timing = {}, {}
  want = lambda m: methods is None or m in methods
  if want("last"):
    out["last"] = recall(task, lambda u: v[task.histories[u][0][-1:]], args.budget)
  if want("decayed_avg"):
    def avg(u):
      rows, times = task.histories[u]
      w = np.exp(-0.01 * (task.nows[u] - times) / DAY)
      return (w[:, None] * v[rows]).sum(0, keepdims=True)
    out["decayed_avg"] = recall(task, avg, args.budget)
  seeds = range(args.seeds)

  def sampled(reps_of):
    """reps_of(u, rng) -> (vectors [k, D], importance [k]); 3 sampled, averaged over seeds."""
    values = []
    for seed in seeds:
      rngs = {u: np.random.default_rng([seed, int(u)]) for u in task.users}

      def queries(u):
        reps, imp = reps_of(u, rngs[u])
        return reps[ps.sample_clusters(imp, rngs[u])]
      values.append(recall(task, queries, args.budget))
    return float(np.mean(values))

  if want("kmeans5"):
    def km(u, rng):
      rows, times = task.histories[u]
      x = v[rows].astype(np.float64)
      labels = kmeans(x, min(5, len(x)), rng)
      k = labels.max() + 1
      cent = np.stack([x[labels == j].mean(0) if (labels == j).any() else np.zeros(x.shape[1])
                       for j in range(k)])
      imp = np.bincount(labels, np.exp(-0.01 * (task.nows[u] - times) / DAY), minlength=k)
      return cent, imp
    out["kmeans5"] = sampled(km)
  if not any(want(m) for m in ("ward_centroid", *(f"ward_medoid_l{lam:g}" for lam in LAMBDAS))):
    return out, timing
  states, seconds = ward(task, alpha, 0.01)
  if methods is None:   # the test run: time it again, compiled (steady-state users/s)
    _, warm = ward(task, alpha, 0.01)
    timing.update(ward_seconds_with_compile=round(seconds, 2), ward_seconds=round(warm, 2),
                  users_per_s=round(len(states) / warm, 1))
  timing["clusters_per_user"] = round(float(np.mean(
      [len(s.clusters.importance) for s in states.values()])), 2)
  for lam in LAMBDAS:
    # The partition and medoids do not depend on lambda: only the importances change.
    imp = {u: np.bincount(s.clusters.labels, np.exp(-lam * (s.now - s.times) / DAY))
           for u, s in states.items()}
    name = f"ward_medoid_l{lam:g}"
    if want(name):
      out[name] = sampled(lambda u, rng, imp=imp: (
          v[states[u].rows[states[u].clusters.medoids]], imp[u]))
    if lam == 0.01 and want("ward_centroid"):
      def centroid(u, rng, imp=imp):
        s = states[u]
        x = v[s.rows]
        cent = np.stack([x[s.clusters.labels == j].mean(0) for j in range(len(imp[u]))])
        return cent, imp[u]
      out["ward_centroid"] = sampled(centroid)
  return out, timing


def split_cuts(ratings, side_mask, quantile, per_user):
  """(train mask within side_mask, cut per user) of the global or the per-user split."""
  users, _, ts = ratings
  if not per_user:
    cut = movielens.time_split(ts[side_mask], quantile)
    return side_mask & (ts < cut), {u: cut for u in np.unique(users)}
  train, cuts = np.zeros_like(side_mask), {}
  for u in np.unique(users[side_mask]):
    sel = side_mask & (users == u)
    try:
      cuts[u] = movielens.time_split(ts[sel], quantile)
    except ValueError:   # every rating at one second: no split for this user
      continue
    train |= sel & (ts < cuts[u])
  return train, cuts


def run_protocol(ratings, args, per_user, external) -> dict:
  all_rows = np.ones(len(ratings[0]), bool)
  train, cuts = split_cuts(ratings, all_rows, args.quantile, per_user)
  val_train, val_cuts = split_cuts(ratings, train, args.quantile, per_user)
  # Validation: targets are the training side after the validation cut (never the test period).
  val_ratings = tuple(r[train] for r in ratings)
  val_task = make_task(val_ratings, val_train[train], val_cuts, args, external)
  tuning = {}
  for alpha in args.alphas:
    res, _ = evaluate(val_task, alpha, args, methods={"ward_medoid_l0.01"})
    tuning[alpha] = round(res["ward_medoid_l0.01"], 4)
    print(f"  validation alpha {alpha:<5g} ward_medoid_l0.01 recall@{args.budget} "
          f"{tuning[alpha]:.4f}", flush=True)
  alpha = max(tuning, key=lambda a: (tuning[a], -a))
  task = make_task(ratings, train, cuts, args, external)
  results, timing = evaluate(task, alpha, args)
  base = results["last"]
  return {"users": len(task.users), "items": len(task.items.ids), "alpha": alpha,
          "validation_users": len(val_task.users), "validation": tuning,
          "recall": {k: round(r, 4) for k, r in results.items()},
          "lift_vs_last": {k: round(r / base - 1, 3) if base else None
                           for k, r in results.items()},
          "left_out": task.left_out, **timing}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=os.environ.get(
      "OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets")))
  parser.add_argument("--item-embeddings", default=None,
                      help="embeddings with id = movie id (default: PPMI-SVD of train data)")
  parser.add_argument("--protocol", choices=("global", "per_user", "both"), default="both")
  parser.add_argument("--budget", type=int, default=ps.BUDGET)
  parser.add_argument("--window-days", type=float, default=90.0)
  parser.add_argument("--horizon-days", type=float, default=0.0,
                      help="next period length (0: everything after the cut)")
  parser.add_argument("--quantile", type=float, default=0.8)
  parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--min-count", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  t0 = time.time()
  try:
    ml = movielens.load(os.path.join(args.datasets, "movielens-latest-small"))
    external = ps_batch.read_items(args.item_embeddings) if args.item_embeddings else None
  except (FileNotFoundError, ValueError) as error:
    print(json.dumps({"pinnersage": {"error": str(error)}}))
    sys.exit(2)
  ratings = (ml.ratings["user"].to_numpy(), ml.ratings["movie"].to_numpy(),
             ml.ratings["timestamp"].to_numpy())
  protocols = ["global", "per_user"] if args.protocol == "both" else [args.protocol]
  summary = {}
  for name in protocols:
    print(f"protocol {name}:", flush=True)
    summary[name] = run_protocol(ratings, args, name == "per_user", external)
    r = summary[name]
    print(f"  {r['users']} users, {r['items']} items, alpha {r['alpha']} (validation), "
          f"{r.get('clusters_per_user')} clusters/user, Ward {r.get('users_per_s')} users/s")
    print(f"  {'method':<20} recall@{args.budget:<5} lift vs last")
    for method, value in r["recall"].items():
      print(f"  {method:<20} {value:<12.4f} {r['lift_vs_last'][method]:+.1%}")
  summary.update(budget=args.budget, window_days=args.window_days, seeds=args.seeds,
                 embeddings=args.item_embeddings or f"ppmi_svd{args.dim}",
                 seconds=round(time.time() - t0, 1))
  print(json.dumps({"pinnersage": summary}))


if __name__ == "__main__":
  main()
