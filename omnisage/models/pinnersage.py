"""PinnerSage user representation: Ward clusters of a user's items, medoids, importances.

PinnerSage (Pal et al., "PinnerSage: Multi-Modal User Embedding Framework for Recommendations at
Pinterest", KDD 2020; SPEC §4) represents a user by several embeddings instead of one: the user's
recent engagements are clustered with Ward's method over FIXED item embeddings (nothing is
learned), each cluster is summarised by its medoid (a real item, so the index can be queried with
it as with any item) and weighted by an importance that decays with the age of its engagements.

`cluster_user(embeddings, timestamps, now, alpha, lam)` does that for ONE user's history and is
the stable entry point of the daily batch job (serving/pinnersage/batch.py, and a Ray Data job
that calls it per group). It is O(N^2) time per user:

- Ward clustering is the nearest-neighbour-chain algorithm (O(N^2) time, O(N^2) memory for the
  condensed distances) run by fastcluster (Müllner, "fastcluster: Fast Hierarchical,
  Agglomerative Clustering Routines for R and Python", J. Stat. Softw. 2013) on SciPy's own
  `pdist` distances. SciPy's `linkage(P, "ward")` is the same pdist followed by its own C code of
  the same algorithm (Müllner, "Modern hierarchical, agglomerative clustering algorithms", 2011),
  so the two give the same Ward hierarchy; fastcluster's chain loop is the faster one, and the
  batch job spends almost all of its time in pdist and that loop.
  The paper's cut at alpha keeps every merge whose height is <= alpha, which is exactly
  `fcluster(Z, alpha, "distance")`. Ward's heights never decrease along the merge order that
  linkage returns, so the kept merges are a prefix of Z; `cut_linkage` applies that prefix with
  vectorised pointer jumping (O(N log N)) instead of fcluster's per-call validation.
  SciPy's heights are sqrt of the Lance-Williams recurrence of SPEC §4 on squared distances,
    d2(Ci u Cj, Ck) = ((ni+nk) d2_ik + (nj+nk) d2_jk - nk d2_ij) / (ni+nj+nk),
  started from ||P_i - P_j||^2 (for two singletons the height is their Euclidean distance; in
  general sqrt(2 ni nj / (ni+nj)) ||c_i - c_j||), so alpha is a Euclidean distance in embedding
  units. fastcluster runs that recurrence on the squared distances and SciPy on their square
  roots, so the two round differently. That only matters when two candidate merges tie exactly
  (Ward's hierarchy is then not unique, e.g. points on an integer lattice): ties at height 0
  (duplicate engagements) give the same partition, and when fastcluster's heights repeat a
  positive value (the mark such ties leave) the user is re-clustered with SciPy so that its
  tie-breaking decides. A tie that leaves no repeated height can still be broken the other way.
- Medoid of cluster C: argmin_{m in C} sum_{j in C} ||P_m - P_j||^2 (the paper's definition).
  Since sum_j ||P_m - P_j||^2 = |C| ||P_m - c_C||^2 + sum_j ||P_j - c_C||^2 with c_C the centroid,
  that is the member nearest the centroid: O(N D) for all clusters at once instead of the O(N^2)
  pairwise sums. Ties (duplicate items) go to the earliest engagement.
- Importance of C: sum_{i in C} exp(-lam * age_days_i), float64 (the paper's lambda = 0.01 with
  ages in days: the SPEC's reading of the unspecified time unit).
- `online_assign`: the paper's cheap online pass (a new action joins the cluster Ward would merge
  it into first when that merge is within the cut, else opens a singleton); the daily batch
  re-clusters the window.

Labels are canonical: clusters are numbered 0..k-1 in order of their earliest member, so two
partitions are equal iff their label arrays are.

Usage: `c = cluster_user(vectors, unix_seconds, now=t, alpha=1.4, lam=0.01)`; c.medoids.
"""

import dataclasses

import numpy as np

DAY_S = 86_400.0


@dataclasses.dataclass
class Clusters:
  """One user's clustering: each action's cluster, each cluster's medoid and importance."""
  labels: np.ndarray       # int32 [n] canonical cluster of each action of the history (members)
  medoids: np.ndarray      # int32 [k] position in the history of each cluster's medoid
  importance: np.ndarray   # float64 [k] sum of exp(-lam * age_days) over the cluster
  sizes: np.ndarray        # int32 [k] actions per cluster


def _points(points) -> np.ndarray:
  x = np.asarray(points, np.float64)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be a [n, dim] matrix, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("embeddings contain NaN or infinity")
  return x


def _alpha(alpha: float) -> float:
  alpha = float(alpha)
  if not alpha >= 0:   # also refuses NaN
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  return alpha


def ward_linkage(points) -> np.ndarray:
  """The Ward linkage matrix [n-1, 4] of one user's points, SciPy's format and merge order
  (float64; [0, 4] when n < 2). See the module docstring for fastcluster vs SciPy."""
  return _ward(_points(points))


def _ward(x: np.ndarray) -> np.ndarray:
  """ward_linkage of already validated float64 points (no second copy or finiteness pass)."""
  if len(x) < 2:
    return np.zeros((0, 4))
  try:   # imported here: the online service (online_assign) needs neither
    import fastcluster
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist
  except ImportError as error:
    raise ImportError("PinnerSage's Ward clustering needs SciPy and fastcluster "
                      "(pip install scipy fastcluster)") from error
  # pdist's buffer is ours alone: fastcluster may use it as scratch instead of copying it.
  overflow = ValueError("embeddings too large: their distances overflow float64")
  try:
    z = fastcluster.linkage(pdist(x), method="ward", preserve_input=False)
  except FloatingPointError as error:   # finite points whose distances overflow: inf - inf
    raise overflow from error
  heights = z[:, 2]
  if not np.isfinite(heights).all():
    raise overflow
  if np.any((heights[1:] == heights[:-1]) & (heights[1:] > 0)):
    return linkage(x, "ward")   # tied merges: SciPy's tie-breaking decides (docstring)
  return z


def canonical(labels) -> np.ndarray:
  """int32 labels renumbered 0..k-1 in order of first appearance; negative entries stay -1."""
  labels = np.asarray(labels)
  out = np.full(labels.shape, -1, np.int32)
  valid = labels >= 0
  _, first, inverse = np.unique(labels[valid], return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int32)
  rank[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=np.int32)
  out[valid] = rank[inverse.reshape(-1)]
  return out


def cut_linkage(z: np.ndarray, n: int, alpha: float) -> np.ndarray:
  """Canonical labels [n] of the linkage `z` cut at height alpha: fcluster(z, alpha, "distance").

  The merges with height <= alpha are a prefix of z (Ward is monotone and linkage sorts by
  height). Merge r creates node n + r; every merged node points to its parent, and pointer
  jumping (parent = parent[parent], log2(n) rounds) takes each leaf to its root.
  """
  alpha = _alpha(alpha)
  z = np.asarray(z)
  kept = int(np.searchsorted(z[:, 2], alpha, side="right")) if len(z) else 0
  if kept and np.any(np.diff(z[:kept + 1, 2]) < 0):
    raise ValueError("linkage heights must not decrease (a Ward linkage from ward_linkage)")
  parent = np.arange(n + kept)
  children = z[:kept, :2].astype(np.int64)
  parent[children[:, 0]] = n + np.arange(kept)
  parent[children[:, 1]] = n + np.arange(kept)
  for _ in range(max(1, int(np.ceil(np.log2(max(kept, 1)))) + 1)):
    parent = parent[parent]
  return _renumber(parent[:n], n + kept)


def _renumber(ids: np.ndarray, size: int) -> np.ndarray:
  """canonical(ids) for ids in [0, size), in O(n) with no sort: rank of each id's first position
  among the first positions (the per-user batch job calls this once per user)."""
  n = len(ids)
  first = np.full(size, n, np.int64)
  np.minimum.at(first, ids, np.arange(n))
  start = first[ids]   # each action's cluster's first position
  rank = np.cumsum(start == np.arange(n), dtype=np.int32) - 1
  return rank[start]


def ward_labels(points, alpha: float) -> np.ndarray:
  """Canonical Ward labels int32 [n] of one user's points cut at height alpha."""
  x = _points(points)
  return cut_linkage(_ward(x), len(x), alpha)


def medoids(points, labels) -> np.ndarray:
  """int32 [k]: position of each cluster's medoid (the member nearest its centroid, see above)."""
  labels = np.asarray(labels, np.int64)
  if not labels.size:
    return np.zeros(0, np.int32)
  # Dense ranks: a partition with unused label values still gets one medoid per used one.
  dense = np.unique(labels, return_inverse=True)[1].reshape(-1)
  return _medoids(_points(points), dense, np.bincount(dense))


def _medoids(x: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """medoids() of validated points, canonical labels and their cluster sizes: one stable sort by
  cluster, then segment reductions over the sorted rows (no loop over clusters)."""
  order = np.argsort(labels, kind="stable")        # by cluster, then position
  starts = np.zeros(len(sizes), np.int64)
  np.cumsum(sizes[:-1], out=starts[1:])
  sorted_labels = labels[order]
  rows = x[order]
  centroid = np.add.reduceat(rows, starts, axis=0) / sizes[:, None]
  rows -= centroid[sorted_labels]
  cost = np.einsum("nd,nd->n", rows, rows)
  # The first member (earliest position) reaching its cluster's least cost.
  hit = np.flatnonzero(cost == np.minimum.reduceat(cost, starts)[sorted_labels])
  seg = sorted_labels[hit]
  return order[hit[np.r_[True, seg[1:] != seg[:-1]]]].astype(np.int32)


def importances(labels, ages_days, lam: float) -> np.ndarray:
  """float64 [k]: per cluster, sum over its actions of exp(-lam * age in days)."""
  labels = np.asarray(labels, np.int64)
  k = int(labels.max()) + 1 if labels.size else 0
  return np.bincount(labels, np.exp(-lam * np.asarray(ages_days, np.float64)), minlength=k)


def summarise(points, labels, ages_days, lam: float) -> Clusters:
  """Clusters of a given partition (canonical labels): medoids, importances, sizes."""
  return _summarise(_points(points), np.asarray(labels, np.int32), ages_days, lam)


def _summarise(x: np.ndarray, labels: np.ndarray, ages_days, lam: float) -> Clusters:
  """summarise() of validated float64 points and int32 canonical labels."""
  sizes = np.bincount(labels)
  imp = np.bincount(labels, np.exp(-lam * np.asarray(ages_days, np.float64)),
                    minlength=len(sizes))
  return Clusters(labels, _medoids(x, labels, sizes), imp, sizes.astype(np.int32))


def cluster_user(embeddings, timestamps, now: float, alpha: float, lam: float = 0.01,
                 labels=None) -> Clusters:
  """PinnerSage's representation of ONE user: Ward clusters cut at alpha, medoids, importances.

  embeddings [n, dim] of the user's engaged items and their unix-second timestamps [n], in time
  order (canonical labels and medoid ties follow that order); ages are (now - t) / 86400 days.
  labels: a given partition (the online pass) instead of clustering. Raises ValueError on an
  empty or malformed history.
  """
  x = _points(embeddings)
  times = np.asarray(timestamps, np.float64)
  if times.shape != (len(x),):
    raise ValueError(f"timestamps must be [n] = [{len(x)}], got shape {times.shape}")
  if not len(x):
    raise ValueError("cluster_user needs at least one engagement")
  if not np.isfinite(times).all() or not np.isfinite(now):
    raise ValueError("timestamps and now must be finite unix seconds")
  lam = float(lam)
  if not lam >= 0:
    raise ValueError(f"lam must be >= 0, got {lam}")
  if labels is None:
    labels = cut_linkage(_ward(x), len(x), alpha)
  else:
    labels = np.asarray(labels, np.int32)
    if labels.shape != (len(x),) or labels.min() < 0:
      raise ValueError(f"labels must be [n] = [{len(x)}] non-negative cluster ids")
  return _summarise(x, labels, (float(now) - times) / DAY_S, lam)


def cluster_histories(vectors: np.ndarray, histories: list, ages_days: list, alpha: float,
                      lam: float, labels: list | None = None) -> list[Clusters]:
  """Clusters of every history (rows into `vectors`, each with its actions' ages in days).

  One `cluster_user`-equivalent call per user (the per-user work is O(N^2) and in C already);
  with `labels` (the online pass) the partitions are given and only summarised.
  """
  out = []
  for u, rows in enumerate(histories):
    x = vectors[np.asarray(rows, np.int64)]
    lab = ward_labels(x, alpha) if labels is None else labels[u]
    out.append(summarise(x, lab, ages_days[u], lam))
  return out


def ward_d2(size: np.ndarray, centroids: np.ndarray, point: np.ndarray) -> np.ndarray:
  """Ward's squared merge height of a singleton {point} with each cluster (scipy's scale):
  2 n / (n + 1) ||point - c||^2, the d2 the Lance-Williams recurrence gives for that pair."""
  diff = centroids - point[None, :]
  return 2.0 * size / (size + 1.0) * np.einsum("kd,kd->k", diff, diff)


def online_assign(labels: np.ndarray, old_points: np.ndarray, new_points: np.ndarray,
                  alpha: float) -> np.ndarray:
  """Labels of old + new actions after the online pass (float64 NumPy, one user).

  labels: int [n] canonical labels of old_points [n, D]; new_points [m, D] in time order. Each new
  action joins the cluster whose Ward merge with it is lowest when that height is <= alpha (the
  merge the batch clustering would make first if nothing else changed); otherwise it opens a new
  cluster (the next label). Centroids and sizes are updated after every action, so a later action
  of the same day can join a cluster an earlier one opened.
  """
  labels = np.asarray(labels, np.int64)
  k = int(labels.max()) + 1 if labels.size else 0
  dim = new_points.shape[1]
  sums = np.zeros((k, dim))
  np.add.at(sums, labels, np.asarray(old_points, np.float64))
  size = np.bincount(labels, minlength=k).astype(np.float64)
  out = list(labels)
  for point in np.asarray(new_points, np.float64):
    if k:
      d2 = ward_d2(size, sums / size[:, None], point)
      best = int(np.argmin(d2))
    if k and d2[best] <= alpha * alpha:
      sums[best] += point
      size[best] += 1
      out.append(best)
    else:
      sums = np.vstack([sums, point[None, :]])
      size = np.append(size, 1.0)
      out.append(k)
      k += 1
  return np.asarray(out, np.int32)
