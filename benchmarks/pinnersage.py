"""PinnerSage on MovieLens, measured as the paper measured it, and the speed of its daily job.

PinnerSage (Pal et al., KDD 2020; SPEC §4) is compared with single-embedding user
representations by the recall of a fixed candidate budget, as lifts over the last engaged item.

Protocol (omnisage/data/user_split.py): each user's last 20% of ratings (at least 1) are TEST
items, everything before is HISTORY; every choice (Ward's alpha, k of k-means) is made on the
VALIDATION split carved the same way out of the histories, and the test split is scored once.
Every representation is built from the user's history of the last --window-days (90) before
the user's last history engagement (`now` of the importances); candidates are the exact
inner-product top items over every embedded movie with the user's whole history excluded, the
same budget (400) for every method. Recall@400 = |candidates ∩ targets| / min(|targets|, 400),
where targets are (a) all test items and (b) the next --horizon (10) engagements; test movies
without an embedding count as misses for every method alike. Means over users with standard
errors; lifts over `last` are paired ratios with delta-method standard errors.

Item embeddings (--embeddings; the whole protocol runs once per set, each with its own alpha
and k chosen on its own validation, and is reported separately):
  ppmi_svd   nothing trained with average pooling (a model trained to average item vectors would
             favour the averaging methods): a rank-64 SVD of the positive PMI of item
             co-occurrence in the users' HISTORY sets (validation: the validation histories),
             rows L2-normalised; movies in fewer than --min-count histories have no embedding.
  two_tower  the item tower of the home-feed two-tower model (benchmarks/twotower_movielens.py,
             configs/twotower_movielens.py "per_user", pooling user encoder), trained the way that
             benchmark trains it: the VALIDATION evaluation's vectors come from a model trained on
             the validation histories (data.stage "validation", the config's train.steps or
             --twotower-steps), the TEST evaluation's from one trained on the full histories
             (data.stage "test", the same epochs and schedule), so no test engagement is seen in
             training. Every catalogue movie (movies.csv, rated or not) is embedded, rows
             L2-normalised. Caveat: its user tower pools the history with learned decay weights,
             an average, so the item space was trained to be averaged and may favour the
             averaging methods; the two sets also rank different candidate sets (every movie vs
             the movies in >= 2 histories), so compare methods within a set, not recalls across.

Methods (all 400 candidates):
  last              the last engaged item
  average           the plain average of the history
  decayed_average   sum_i exp(-0.01 age_days_i) P_i
  kmeans            k-means (k chosen on validation), 3 centroids sampled by importance
  ward_centroid     Ward (alpha chosen on validation) + centroids, 3 sampled (lambda 0.01)
  ward_medoid_l*    Ward + medoids, lambda 0 / 0.01 / 0.1, 3 medoids sampled by importance
                    (the paper's method: lambda 0.01), merged round robin
  ward_medoid_all   Ward + ALL medoids, each given a share of the 400 proportional to its
                    importance (largest remainder), lambda 0.01
Sampled methods are averaged over --seeds seeds per user. Users are also bucketed by how
diverse their history is: the number of Ward clusters at the chosen alpha.

Speed: the batch job's per-user clustering (`cluster_user`: Ward by fastcluster on SciPy's pdist
+ cut + medoids + importances) against SciPy's `fcluster(linkage(P, "ward"), alpha, "distance")`
per user (median over interleaved rounds of the per-round ratio), and a NumPy
nearest-neighbour-chain, at history lengths 128, 512, 1024, 4096 (64-d unit vectors around 20
centres); then the whole batch job (`run_batch`) over every MovieLens user's ratings.

Usage:
  .venv/bin/python benchmarks/pinnersage.py [--datasets ../shared/datasets] \
      [--embeddings ppmi_svd,two_tower] [--twotower-steps N]
Prints the tables (one heading per embedding set) and ends with one JSON line
{"pinnersage": {...}}: "protocol" is the ppmi_svd protocol, "protocol_two_tower" the two-tower
one (the same structure, plus "two_tower": how it was trained), "embeddings" the sets run, and
"ward_speed_vs_scipy" maps each history length to (our users/s) / (SciPy's users/s). The speed
figures and the whole batch job use the ppmi_svd embeddings.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `python benchmarks/pinnersage.py` from anywhere: benchmarks, configs
  sys.path.insert(0, ROOT)

# Before NumPy loads: on a small shared box, OpenBLAS's threads make the many small [3, D] x [D, N]
# products of the retrieval loop several times slower than one thread does. Ward (pdist and the
# nearest-neighbour chain, SciPy's or fastcluster's C) and the medoids use no BLAS, so the speed
# comparison is unaffected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from omnisage.data.sources import movielens  # noqa: E402
from omnisage.data.user_split import per_user_split, validation_split  # noqa: E402
from omnisage.models import pinnersage as model  # noqa: E402
from omnisage.serving.pinnersage import batch as ps_batch  # noqa: E402
from omnisage.serving.pinnersage import service as ps  # noqa: E402

DAY = model.DAY_S
ALPHAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.4, 3.2)
KMEANS_KS = (3, 5, 10, 20)
LAMBDAS = (0.0, 0.01, 0.1)
BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 10**9))
SPEED_USERS = {128: 200, 512: 30, 1024: 10, 4096: 2}
EMBEDDINGS = {"ppmi_svd": "SVD (rank --dim) of the positive PMI of history co-occurrence",
              "two_tower": "the per-user two-tower model's item tower"}


# --- item embeddings ---------------------------------------------------------------------------

def ppmi_svd(histories: dict, dim: int, min_count: int, seed: int) -> ps_batch.Items:
  """Rank-`dim` SVD (U sqrt(S), rows L2-normalised) of the positive PMI of item co-occurrence in
  the users' history sets; movies in fewer than `min_count` histories get no embedding."""
  users = sorted(histories)
  ids, counts = np.unique(np.concatenate([histories[u] for u in users]), return_counts=True)
  ids = ids[counts >= min_count]
  col = {m: i for i, m in enumerate(ids.tolist())}
  x = np.zeros((len(users), len(ids)), np.float32)
  for r, u in enumerate(users):
    x[r, [col[m] for m in histories[u].tolist() if m in col]] = 1.0
  co = x.T @ x
  np.fill_diagonal(co, 0.0)
  total, marg = co.sum(), co.sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(co * total / np.outer(marg, marg))
  ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0).astype(np.float32)
  del co, pmi
  rng = np.random.default_rng(seed)
  q = ppmi @ rng.standard_normal((len(ids), dim + 16)).astype(np.float32)
  for _ in range(3):   # power iterations (ppmi is symmetric)
    q, _ = np.linalg.qr(ppmi @ q)
  u_small, s, _ = np.linalg.svd(q.T @ ppmi, full_matrices=False)
  emb = (q @ u_small[:, :dim]) * np.sqrt(s[:dim])[None, :]
  emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return ps_batch.Items.create([str(m) for m in ids], emb)


class TwoTowerItems:
  """embed(split, stage) -> Items: the item tower of the per-user two-tower model trained on the
  stage's histories (benchmarks/twotower_movielens.py's train_stage), every catalogue movie, rows
  L2-normalised, keyed by MovieLens movie id. The test stage trains as many epochs, under the same
  schedule, as the validation stage did (twotower_movielens.same_epochs) when that ran first."""

  def __init__(self, ml, args, log):
    self.ml, self.args, self.log = ml, args, log
    self.info = {"encoder": "pool", "config": "per_user_tiny" if args.twotower_tiny
                 else "per_user", "steps": {}, "epochs": {}, "train_seconds": {}}
    self.examples = {}

  def __call__(self, split, stage) -> ps_batch.Items:
    from benchmarks import twotower_movielens as tt
    from omnisage.train.twotower.protocol import _blocks, _items
    a = self.args
    config = tt.per_user_config(argparse.Namespace(
        movielens=self.ml.path, tiny=a.twotower_tiny, test_fraction=a.test_fraction,
        steps=a.twotower_steps, eval_every=0), "pool", stage)
    if stage == "test" and "validation" in self.examples:
      tt.same_epochs(config, int(config.train.steps), self.examples["validation"], split)
    steps = int(config.train.steps)
    got = {}

    def make_evaluate(prepared, catalogue):
      def evaluate(statics, params, step):
        if step == steps:   # the trained model: every catalogue movie through the item tower
          idx = np.arange(1, catalogue.size + 1)
          got["ids"] = [catalogue.ids[i] for i in idx]   # str(movie id): catalogue.index_of
          got["vectors"] = _blocks(_items, statics, params, catalogue.item_inputs(idx),
                                   int(config.eval.batch_size))
        return {}
      return evaluate

    t0 = time.time()
    with tempfile.TemporaryDirectory() as workdir:
      meta, _ = tt.train_stage(config, workdir, self.ml, make_evaluate)
    if "vectors" not in got:
      raise RuntimeError(f"two-tower {stage}: training ended before step {steps}")
    v = np.asarray(got["vectors"], np.float32)
    if not np.isfinite(v).all():
      raise FloatingPointError(f"two-tower {stage}: non-finite item vectors")
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    self.examples[stage] = int(meta["train_examples"])
    self.info["steps"][stage] = steps
    self.info["epochs"][stage] = round(steps * int(config.train.batch_size)
                                       / self.examples[stage], 2)
    self.info["train_seconds"][stage] = round(time.time() - t0, 1)
    self.log(f"  two-tower {stage}: {steps} steps ({self.info['epochs'][stage]} epochs of "
             f"{self.examples[stage]} examples), {len(v)} movies embedded "
             f"({self.info['train_seconds'][stage]:.0f} s)")
    return ps_batch.Items.create(got["ids"], v)


# --- one evaluation (validation or test) -------------------------------------------------------

class Task:
  """Embeddings, each user's windowed history (rows, times, now), exclusions and targets."""

  def __init__(self, split, items: ps_batch.Items, args):
    self.items = items
    self.vectors = self.items.vectors
    self.vectors_t = np.ascontiguousarray(self.vectors.T)   # [D, N]: the fast product layout
    row = self.items.row
    self.rows, self.times, self.now, self.exclude = {}, {}, {}, {}
    self.targets_all, self.targets_next = {}, {}
    self.left_out = {"users_without_embedded_history": 0}
    unembedded = total = 0
    for u in split.users:
      hist = np.asarray([row.get(str(m), -1) for m in split.history[u].tolist()], np.int64)
      times = split.history_times[u]
      now = int(times[-1])
      keep = (hist >= 0) & (times >= now - args.window_days * DAY)
      if not keep.any():
        self.left_out["users_without_embedded_history"] += 1
        continue
      test = [row.get(str(m), -1) for m in split.test[u].tolist()]
      unembedded += sum(r < 0 for r in test)
      total += len(test)
      self.rows[u], self.times[u], self.now[u] = hist[keep], times[keep], now
      self.exclude[u] = hist[hist >= 0]
      self.targets_all[u] = test
      self.targets_next[u] = test[:args.horizon]
    self.users = sorted(self.rows)
    self.left_out["test_items_without_embedding"] = f"{unembedded} of {total}"
    self.linkage = {}

  def ages(self, u):
    return (self.now[u] - self.times[u]) / DAY

  def ward(self, alpha):
    """user -> canonical labels at alpha (one SciPy linkage per user, cut at any alpha)."""
    if not self.linkage:
      for u in self.users:
        self.linkage[u] = model.ward_linkage(self.vectors[self.rows[u]])
    return {u: model.cut_linkage(self.linkage[u], len(self.rows[u]), alpha) for u in self.users}


def ranked(vectors_t, queries, exclude, depth):
  """Per query, the `depth` best item rows by inner product, excluded rows left out."""
  scores = np.asarray(queries, np.float32) @ vectors_t
  scores[:, exclude] = -np.inf
  depth = min(depth, scores.shape[1] - len(exclude))
  top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
  order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
  return np.take_along_axis(top, order, 1)


def round_robin(task, u, queries, budget):
  lists = ranked(task.vectors_t, queries, task.exclude[u], budget)
  return ps.merge_round_robin(lists.tolist(), budget)


def proportional(task, u, queries, importance, budget):
  """All queries, query c getting a share of the budget proportional to its importance (largest
  remainder), taken in order of importance; duplicates are skipped so the budget is filled."""
  w = np.asarray(importance, np.float64)
  share = budget * w / w.sum()
  b = np.floor(share).astype(int)
  b[np.argsort(-(share - b), kind="stable")[:budget - b.sum()]] += 1
  order = [c for c in np.argsort(-w, kind="stable") if b[c] > 0]
  lists = ranked(task.vectors_t, queries[order], task.exclude[u], budget)
  seen, out = set(), []
  for c, lst in zip(order, lists.tolist()):
    got = 0
    for r in lst:
      if got == b[c]:
        break
      if r not in seen:
        seen.add(r)
        out.append(r)
        got += 1
  return out


def kmeans(x: np.ndarray, k: int, rng, steps: int = 25) -> np.ndarray:
  """Canonical labels of Lloyd's k-means with k-means++ seeding."""
  centres = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
    centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
  c = np.asarray(centres)
  for _ in range(steps):
    labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    c = np.asarray([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
  return model.canonical(labels)


def centroids(x, labels):
  k = labels.max() + 1
  return np.stack([x[labels == j].mean(0) for j in range(k)])


def per_user_recall(task, candidates_of, seeds, budget) -> dict:
  """{"all": [U], "next": [U]} recall per user, averaged over seeds; candidates_of(u, rng)."""
  out = {"all": np.zeros(len(task.users)), "next": np.zeros(len(task.users))}
  for i, u in enumerate(task.users):
    for seed in range(seeds):
      got = set(candidates_of(u, np.random.default_rng([seed, int(u)])))
      for name, targets in (("all", task.targets_all[u]), ("next", task.targets_next[u])):
        hits = sum(1 for r in targets if r in got)
        out[name][i] += hits / min(len(targets), budget) / seeds
  return out


def methods(task, args, alpha, k_means, only=None) -> dict:
  """{method: per-user recalls} on `task` at Ward cut `alpha` and k-means k."""
  v, budget = task.vectors, args.budget
  want = lambda m: only is None or m in only
  out = {}
  single = {
      "last": lambda u: v[task.rows[u][-1:]],
      "average": lambda u: v[task.rows[u]].mean(0, keepdims=True),
      "decayed_average": lambda u: (np.exp(-0.01 * task.ages(u))[:, None]
                                    * v[task.rows[u]]).sum(0, keepdims=True)}
  for name, query in single.items():
    if want(name):
      out[name] = per_user_recall(
          task, lambda u, rng, q=query: round_robin(task, u, q(u), budget), 1, budget)

  def sampled(reps_of):
    def cands(u, rng):
      reps, imp = reps_of(u, rng)
      return round_robin(task, u, reps[ps.sample_clusters(imp, rng)], budget)
    return per_user_recall(task, cands, args.seeds, budget)

  if want("kmeans"):
    def km(u, rng):
      x = v[task.rows[u]].astype(np.float64)
      labels = kmeans(x, min(k_means, len(np.unique(x, axis=0))), rng)
      return centroids(x, labels), model.importances(labels, task.ages(u), 0.01)
    out["kmeans"] = sampled(km)
  wards = [m for m in ("ward_centroid", "ward_medoid_all", *(f"ward_medoid_l{lam:g}"
                                                               for lam in LAMBDAS)) if want(m)]
  if not wards:
    return out
  labels = task.ward(alpha)
  meds = {u: model.medoids(v[task.rows[u]], labels[u]) for u in task.users}
  for lam in LAMBDAS:
    # The partition and medoids do not depend on lambda: only the importances do.
    imp = {u: model.importances(labels[u], task.ages(u), lam) for u in task.users}
    if want(f"ward_medoid_l{lam:g}"):
      out[f"ward_medoid_l{lam:g}"] = sampled(
          lambda u, rng, imp=imp: (v[task.rows[u][meds[u]]], imp[u]))
    if lam == 0.01 and want("ward_centroid"):
      out["ward_centroid"] = sampled(
          lambda u, rng, imp=imp: (centroids(v[task.rows[u]], labels[u]), imp[u]))
    if lam == 0.01 and want("ward_medoid_all"):
      out["ward_medoid_all"] = per_user_recall(
          task, lambda u, rng, imp=imp: proportional(task, u, v[task.rows[u][meds[u]]], imp[u],
                                                     budget), 1, budget)
  return out


# --- statistics --------------------------------------------------------------------------------

def mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def lift_se(a, b) -> tuple[float, float]:
  """mean(a) / mean(b) - 1 over paired users, with its delta-method standard error."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or b.mean() == 0:
    return float("nan"), float("nan")
  r = a.mean() / b.mean()
  return float(r - 1), float(np.std(a - r * b, ddof=1) / np.sqrt(len(a)) / b.mean())


# --- protocol ----------------------------------------------------------------------------------

def choose_alpha(val, args, log) -> tuple[float, dict]:
  """Best validation Recall@400 of ward_medoid_l0.01 (all later items); the grid is widened
  until the best alpha is interior, or until an edge is a limit where a further step changes
  nothing: every user one cluster (top) or every action its own cluster (bottom)."""
  grid, scores = sorted(args.alphas), {}
  singletons = np.mean([len(val.rows[u]) for u in val.users])   # clusters/user at alpha -> 0
  for _ in range(30):
    for alpha in grid:
      if alpha not in scores:
        rec = methods(val, args, alpha, 0, only={"ward_medoid_l0.01"})["ward_medoid_l0.01"]
        k = np.mean([lab.max() + 1 for lab in val.ward(alpha).values()])
        scores[alpha] = {"recall": round(mean_se(rec["all"])[0], 4), "clusters_per_user":
                         round(float(k), 2)}
        log(f"  validation alpha {alpha:<6.3g} ward_medoid_l0.01 recall@{args.budget} "
            f"{scores[alpha]['recall']:.4f}  clusters/user {k:.2f}")
    best = max(grid, key=lambda a: (scores[a]["recall"], -a))
    if best == grid[-1] and scores[best]["clusters_per_user"] > 1.0:
      grid.append(round(grid[-1] * 1.35, 3))
    elif best == grid[0] and scores[best]["clusters_per_user"] < singletons:
      grid.insert(0, round(grid[0] / 1.35, 4))
    else:
      return best, scores
  return best, scores


def choose_k(val, args, log) -> tuple[int, dict]:
  scores = {}
  for k in args.kmeans_ks:
    rec = methods(val, args, 0.0, k, only={"kmeans"})["kmeans"]
    scores[k] = round(mean_se(rec["all"])[0], 4)
    log(f"  validation k-means k {k:<4d} recall@{args.budget} {scores[k]:.4f}")
  return max(scores, key=lambda k: (scores[k], -k)), scores


def bucket_name(lo, hi):
  return str(lo) if lo == hi else f"{lo}+" if hi > 10**8 else f"{lo}-{hi}"


def protocol(ml, args, log, embed) -> dict:
  """The protocol over item embeddings embed(split, stage) -> Items, stage "validation" for the
  choices and "test" for the one score (each from that split's histories only)."""
  r = ml.ratings
  users, movies, ts = (r[c].to_numpy() for c in ("user", "movie", "timestamp"))
  split = per_user_split(users, movies, ts, args.test_fraction)
  val_split = validation_split(split, args.test_fraction)
  t0 = time.time()
  val = Task(val_split, embed(val_split, "validation"), args)
  alpha, alpha_scores = choose_alpha(val, args, log)
  k_means, k_scores = choose_k(val, args, log)
  log(f"  chosen on validation: alpha {alpha}, k-means k {k_means} ({time.time() - t0:.0f} s)")
  del val
  test = Task(split, embed(split, "test"), args)   # the test split, scored once
  per_user = methods(test, args, alpha, k_means)
  base = per_user["last"]
  out = {"users": len(test.users), "items": len(test.items.ids), "alpha": alpha,
         "kmeans_k": k_means, "validation": {"alpha": alpha_scores, "kmeans_k": k_scores},
         "left_out": test.left_out, "skipped": split.skipped, "recall": {}, "lift_vs_last": {}}
  for targets in ("all", "next"):
    out["recall"][targets] = {m: mean_se(p[targets]) for m, p in per_user.items()}
    out["lift_vs_last"][targets] = {m: lift_se(p[targets], base[targets])
                                    for m, p in per_user.items()}
  clusters = np.asarray([lab.max() + 1 for lab in test.ward(alpha).values()])
  out["clusters_per_user"] = {"mean": round(float(clusters.mean()), 2),
                              "median": float(np.median(clusters)), "max": int(clusters.max())}
  out["by_diversity"] = {}
  for lo, hi in BUCKETS:
    sel = (clusters >= lo) & (clusters <= hi)
    if sel.sum() < 2:
      continue
    out["by_diversity"][bucket_name(lo, hi)] = {
        "users": int(sel.sum()), "last_recall": mean_se(base["all"][sel]),
        "lift": {m: lift_se(p["all"][sel], base["all"][sel]) for m, p in per_user.items()
                 if m != "last"}}
  return out


# --- speed -------------------------------------------------------------------------------------

def nn_chain_numpy(x: np.ndarray, alpha: float) -> np.ndarray:
  """Ward by the nearest-neighbour chain in NumPy (O(N^2): each step is one O(N) row scan or
  Lance-Williams row update), cut at alpha: the side-by-side alternative to SciPy's C."""
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components
  n = len(x)
  sq = np.einsum("nd,nd->n", x, x)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
  np.fill_diagonal(d2, np.inf)
  size = np.ones(n)
  active = np.ones(n, bool)
  chain, edges = [], []
  for _ in range(n - 1):
    if not chain:
      chain.append(int(np.argmax(active)))
    while True:
      a = chain[-1]
      b = int(np.argmin(d2[a]))
      if len(chain) > 1 and d2[a, chain[-2]] <= d2[a, b]:
        b = chain[-2]
      if len(chain) > 1 and b == chain[-2]:
        break
      chain.append(b)
    a, b = chain.pop(), chain.pop()
    lo, hi = min(a, b), max(a, b)
    h2 = d2[a, b]
    new = ((size[a] + size) * d2[a] + (size[b] + size) * d2[b] - size * h2) / (
        size[a] + size[b] + size)
    d2[lo, :] = new
    d2[:, lo] = new
    d2[hi, :] = np.inf
    d2[:, hi] = np.inf
    d2[lo, lo] = np.inf
    size[lo] += size[hi]
    size[hi] = 0.0
    active[hi] = False
    if h2 <= alpha * alpha:
      edges.append((lo, hi))
  e = np.asarray(edges, np.int64).reshape(-1, 2)
  graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
  return model.canonical(connected_components(graph, directed=False)[1])


def speed(args, log) -> dict:
  """users/s of cluster_user and of SciPy's fcluster(linkage(P, "ward"), alpha, "distance") on the
  same users, in rounds that alternate which of the two goes first; the ratio is the median over
  rounds of the per-round ratio, so a burst of load from another process on a shared box moves
  one round, not the answer. The NumPy nearest-neighbour chain is timed once (a reference)."""
  from scipy.cluster.hierarchy import fcluster, linkage
  rng = np.random.default_rng(0)
  out = {}
  for n in args.lengths:
    users = max(1, int(SPEED_USERS.get(n, 2) * args.speed_scale))
    data = []
    for _ in range(users):
      centre = rng.standard_normal((20, 64))
      x = centre[rng.integers(0, 20, n)] + 0.7 * rng.standard_normal((n, 64))
      x /= np.linalg.norm(x, axis=1, keepdims=True)
      data.append((x.astype(np.float32), np.sort(rng.uniform(0, 90 * DAY, n))))
    runs = {
        "ours": lambda x, t: model.cluster_user(x, t, 90 * DAY, args.speed_alpha, 0.01),
        "scipy": lambda x, t: fcluster(linkage(x, "ward"), args.speed_alpha, "distance"),
        "nn_chain_numpy": lambda x, t: nn_chain_numpy(x.astype(np.float64), args.speed_alpha)}
    # Same answer first, for every timed user (partition up to label permutation).
    for x, t in data:
      assert np.array_equal(runs["ours"](x, t).labels, model.canonical(runs["scipy"](x, t)))
    assert np.array_equal(runs["nn_chain_numpy"](*data[0]),
                          model.canonical(runs["scipy"](*data[0])))

    def timed(name):
      t0 = time.perf_counter()
      for x, t in data:
        runs[name](x, t)
      return time.perf_counter() - t0

    seconds = {"ours": [], "scipy": []}
    ratios = []
    for r in range(args.speed_repeats):
      for name in (("ours", "scipy") if r % 2 == 0 else ("scipy", "ours")):
        seconds[name].append(timed(name))
      ratios.append(seconds["scipy"][-1] / seconds["ours"][-1])
    ups = {name: users / float(np.median(s)) for name, s in seconds.items()}
    ups["nn_chain_numpy"] = users / timed("nn_chain_numpy")
    out[n] = {"users": users, "rounds": args.speed_repeats,
              "users_per_s": {k: round(v, 2) for k, v in ups.items()},
              "ratio_vs_scipy": round(float(np.median(ratios)), 3),
              "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
              "nn_chain_numpy_vs_scipy": round(ups["nn_chain_numpy"] / ups["scipy"], 3)}
    log(f"  N={n:<5d} users/s: ours {ups['ours']:9.2f}  scipy {ups['scipy']:9.2f}  "
        f"numpy nn-chain {ups['nn_chain_numpy']:9.2f}   ours/scipy {out[n]['ratio_vs_scipy']:.3f} "
        f"(rounds {out[n]['ratio_min_max'][0]:.3f}..{out[n]['ratio_min_max'][1]:.3f})")
  return out


def whole_job(ml, items, alpha, log) -> dict:
  """run_batch over every MovieLens rating (no window cut: every user's whole history)."""
  r = ml.ratings
  with tempfile.TemporaryDirectory() as tmp:
    emb = os.path.join(tmp, "items.parquet")
    pq.write_table(pa.table({"id": items.ids, "embedding": pa.array(
        list(items.vectors), pa.list_(pa.float32(), items.vectors.shape[1]))}), emb)
    actions = os.path.join(tmp, "actions.parquet")
    pq.write_table(pa.table({"user_id": r["user"].to_numpy().astype(str),
                             "item_id": r["movie"].to_numpy().astype(str),
                             "timestamp": r["timestamp"].to_numpy().astype(np.int64)}), actions)
    summary = ps_batch.run_batch(emb, actions, os.path.join(tmp, "out"), alpha=alpha,
                                 window_days=1e5, max_history=4096)
  keys = ("users", "actions", "actions_clustered", "clusters", "cluster_seconds", "users_per_s",
          "seconds")
  out = {k: summary[k] for k in keys}
  log(f"  run_batch over all {out['users']} users, {out['actions_clustered']} ratings: "
      f"{out['seconds']} s in all, clustering {out['cluster_seconds']} s "
      f"({out['users_per_s']} users/s)")
  return out


# --- printing ----------------------------------------------------------------------------------

def fmt(pair, pct=False):
  m, s = pair
  if pct:
    return f"{m:+.1%} ± {s:.1%}"
  return f"{m:.4f} ± {s:.4f}"


def print_tables(r, args, log):
  log(f"\nper-user temporal protocol: {r['users']} users, {r['items']} embedded movies, "
      f"alpha {r['alpha']}, k-means k {r['kmeans_k']}, Ward clusters/user "
      f"{r['clusters_per_user']}; left out {r['left_out']}")
  log(f"\n| method | Recall@{args.budget}, all later | lift vs last | "
      f"Recall@{args.budget}, next {args.horizon} | lift vs last |")
  log("|---|---|---|---|---|")
  for m in r["recall"]["all"]:
    log(f"| {m} | {fmt(r['recall']['all'][m])} | {fmt(r['lift_vs_last']['all'][m], True)} | "
        f"{fmt(r['recall']['next'][m])} | {fmt(r['lift_vs_last']['next'][m], True)} |")
  buckets = r["by_diversity"]
  log("\nlift vs last (all later items) by Ward clusters in the history:")
  log("| method | " + " | ".join(f"{b} ({v['users']} users)" for b, v in buckets.items()) + " |")
  log("|---|" + "---|" * len(buckets))
  log("| last: Recall | " + " | ".join(fmt(v["last_recall"]) for v in buckets.values()) + " |")
  for m in next(iter(buckets.values()))["lift"]:
    log(f"| {m} | " + " | ".join(fmt(v["lift"][m], True) for v in buckets.values()) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=os.environ.get(
      "OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets")))
  parser.add_argument("--budget", type=int, default=ps.BUDGET)
  parser.add_argument("--window-days", type=float, default=90.0)
  parser.add_argument("--horizon", type=int, default=10, help="next N test engagements")
  parser.add_argument("--test-fraction", type=float, default=0.2)
  parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  parser.add_argument("--kmeans-ks", type=int, nargs="+", default=list(KMEANS_KS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--min-count", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-users", type=int, default=0, help="0: all (tests use fewer)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 4096])
  parser.add_argument("--speed-scale", type=float, default=1.0, help="users per length x this")
  parser.add_argument("--speed-repeats", type=int, default=9, help="interleaved rounds")
  parser.add_argument("--speed-alpha", type=float, default=1.4)
  parser.add_argument("--skip", choices=("protocol", "speed", "whole_job"), nargs="*",
                      default=[])
  parser.add_argument("--embeddings", default=",".join(EMBEDDINGS),
                      help="comma list of item-embedding sets, the protocol run once per set: "
                           + ", ".join(EMBEDDINGS))
  parser.add_argument("--twotower-steps", type=int, default=0,
                      help="two-tower validation-stage steps (0: the config's train.steps)")
  parser.add_argument("--twotower-tiny", action="store_true",
                      help="the two-tower config's tiny model (tests)")
  args = parser.parse_args()
  args.embeddings = [e for e in args.embeddings.split(",") if e]
  unknown = sorted(set(args.embeddings) - set(EMBEDDINGS))
  if unknown or not args.embeddings:
    parser.error(f"--embeddings: a comma list of {', '.join(EMBEDDINGS)}, got {unknown or '[]'}")
  for name, value in (("budget", args.budget), ("horizon", args.horizon), ("seeds", args.seeds)):
    if value < 1:
      parser.error(f"--{name} must be >= 1, got {value}")
  t0 = time.time()
  log = lambda s: print(s, flush=True)
  try:
    ml = movielens.load(os.path.join(args.datasets, "movielens-latest-small"))
  except (FileNotFoundError, ValueError) as error:
    print(json.dumps({"pinnersage": {"error": str(error)}}))
    sys.exit(2)
  if args.max_users:
    keep = np.isin(ml.ratings["user"].to_numpy(), np.unique(ml.ratings["user"].to_numpy())[
        :args.max_users])
    ml.ratings = ml.ratings.filter(pa.array(keep))
  summary = {}
  if "protocol" not in args.skip:
    for name in args.embeddings:
      log(f"\n=== item embeddings: {name} ({EMBEDDINGS[name]}) ===")
      log("protocol (per-user temporal split; choices on validation):")
      if name == "two_tower":
        embed = TwoTowerItems(ml, args, log)
      else:
        embed = lambda split, stage: ppmi_svd(split.history, args.dim, args.min_count, args.seed)
      result = protocol(ml, args, log, embed)
      if name == "two_tower":
        result["two_tower"] = embed.info
      print_tables(result, args, log)
      summary["protocol" if name == "ppmi_svd" else f"protocol_{name}"] = result
  if "speed" not in args.skip:
    log("\nWard per user: users/s of cluster_user vs SciPy fcluster(linkage) (median of "
        f"{args.speed_repeats} interleaved rounds)")
    sp = speed(args, log)
    summary["speed"] = sp
    summary["ward_speed_vs_scipy"] = {str(n): v["ratio_vs_scipy"] for n, v in sp.items()}
  if "speed" not in args.skip and "whole_job" not in args.skip:
    split = per_user_split(*(ml.ratings[c].to_numpy() for c in ("user", "movie", "timestamp")))
    items = ppmi_svd(split.history, args.dim, args.min_count, args.seed)
    alpha = summary.get("protocol", {}).get("alpha", ps_batch.DEFAULTS["alpha"])
    summary["whole_job"] = whole_job(ml, items, alpha, log)
  summary.update(budget=args.budget, window_days=args.window_days, horizon=args.horizon,
                 seeds=args.seeds, embeddings=args.embeddings,
                 seconds=round(time.time() - t0, 1))
  print(json.dumps({"pinnersage": summary}))


if __name__ == "__main__":
  main()
