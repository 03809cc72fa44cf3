"""PinnerSage user representation: Ward clusters of a user's items, medoids, importances (SPEC §4).

Pure functions over FIXED item embeddings (nothing is learned):

- `ward_labels(points, mask, alpha)`: Ward agglomerative clustering of every user of a padded
  batch at once ([B, N, D] points, [B, N] mask). One jitted, vmapped merge loop: each iteration
  merges the closest active pair of one user and updates its distances with the Lance-Williams
  recurrence of Ward's method, written for SQUARED distances as in SPEC §4,
    d2(Ci u Cj, Ck) = ((ni+nk) d2_ik + (nj+nk) d2_jk - nk d2_ij) / (ni+nj+nk),
  starting from d2_ij = ||P_i - P_j||^2. A user whose next merge lies above the cut stops (its
  state is frozen by the masked while_loop) while the others go on.
- "Cut at alpha" is exactly scipy's `fcluster(linkage(P, "ward"), alpha, criterion="distance")`:
  scipy's Ward heights are sqrt(d2) of the recurrence above (for two singletons, the Euclidean
  distance; in general sqrt(2 ni nj / (ni+nj)) ||c_i - c_j||), and fcluster keeps every merge whose
  height is <= alpha. Ward heights never decrease along the merge sequence, so this is the same
  as merging greedily while the smallest d2 is <= alpha^2 and stopping at the first one above it.
  alpha is therefore in the units of the embeddings (a Euclidean distance).
- `medoids(points, mask, labels)`: per cluster, argmin_{m in C} sum_{j in C} ||P_m - P_j||^2
  (the SPEC's definition, computed literally from the pairwise squared distances; ties go to the
  earliest action).
- `importances(labels, ages_days, lam)`: sum_{i in C} exp(-lam * age_i) in float64.
- `online_assign`: the cheap online pass (new actions join the cluster Ward would merge them into
  first when that merge is within the cut, else open a singleton); the daily reconcile re-runs the
  batch clustering over the 90-day window.

Labels are canonical: clusters are numbered 0..k-1 in order of their earliest member (padding -1),
so two partitions are equal iff their label arrays are.

Usage: `labels = ward_labels(points, mask, alpha=0.8)` -> int32 [B, N].
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DAY_S = 86_400.0


def _pairwise_d2(x: jax.Array) -> jax.Array:
  """||x_i - x_j||^2 [N, N] from the Gram matrix, clipped at 0 (round-off can go below), exactly
  symmetric with a zero diagonal (a matmul need not be): the two members of a pair then tie
  exactly, and the medoid tie-break (earliest action) holds."""
  sq = jnp.sum(x * x, axis=-1)
  gram = x @ x.T
  gram = 0.5 * (gram + gram.T)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)   # sq_i - gram_ii need not be 0


def _ward_one(points: jax.Array, mask: jax.Array, alpha2: jax.Array) -> jax.Array:
  """One user's merge loop: rep[i] = the (lowest-merged) surviving index of point i's cluster.

  Pairs that cannot merge (the diagonal, padding, clusters already merged away) hold +inf, so
  each iteration is one argmin over the matrix plus one row update: O(N^2), O(N^3) in all.
  The Lance-Williams update keeps them at +inf (size 0 there, so no 0 * inf).
  """
  n = points.shape[0]
  valid = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
  d2 = jnp.where(valid, _pairwise_d2(points), jnp.inf)
  size = mask.astype(points.dtype)
  rep = jnp.arange(n)

  def closest(d2):
    flat = jnp.argmin(d2)   # first occurrence: row-major, so i < j on ties
    return flat, d2.reshape(-1)[flat]

  def cond(state):
    *_, best = state
    return best <= alpha2

  def body(state):
    d2, size, rep, flat, best = state
    a, b = flat // n, flat % n
    i, j = jnp.minimum(a, b), jnp.maximum(a, b)   # the merged cluster lives on at i
    ni, nj = size[i], size[j]
    # Lance-Williams for Ward on squared distances (SPEC §4).
    new = ((ni + size) * d2[i] + (nj + size) * d2[j] - size * best) / (ni + nj + size)
    new = jnp.maximum(new, 0.0).at[i].set(jnp.inf).at[j].set(jnp.inf)
    d2 = d2.at[i, :].set(new).at[:, i].set(new)
    d2 = d2.at[j, :].set(jnp.inf).at[:, j].set(jnp.inf)
    size = size.at[i].add(nj).at[j].set(0.0)
    rep = jnp.where(rep == j, i, rep)
    flat, best = closest(d2)
    return d2, size, rep, flat, best

  flat, best = closest(d2)
  *_, rep, _, _ = jax.lax.while_loop(cond, body, (d2, size, rep, flat, best))
  return jnp.where(mask, rep, -1)


@jax.jit
def _ward_batch(points, mask, alpha2):
  return jax.vmap(_ward_one, in_axes=(0, 0, None))(points, mask, alpha2)


def canonical(rep: np.ndarray) -> np.ndarray:
  """Relabels each row's clusters 0..k-1 in order of first appearance; -1 stays -1."""
  rep = np.asarray(rep)
  out = np.full(rep.shape, -1, np.int32)
  for b in range(rep.shape[0]):
    row = rep[b]
    valid = row >= 0
    _, first, inverse = np.unique(row[valid], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))   # rank of each unique rep by its first position
    out[b, valid] = order[inverse]
  return out


def ward_labels(points, mask, alpha: float) -> np.ndarray:
  """Canonical Ward cluster labels int32 [B, N] (padding -1), cut at height alpha (see above)."""
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  points = jnp.asarray(points, jnp.float32)
  mask = jnp.asarray(mask, bool)
  rep = _ward_batch(points, mask, jnp.float32(alpha) ** 2)
  return canonical(np.asarray(rep))


@jax.jit
def _medoid_batch(points, labels):
  def one(x, label):
    n = x.shape[0]
    d2 = _pairwise_d2(x)
    same = (label[:, None] == label[None, :]) & (label[:, None] >= 0)
    cost = jnp.sum(jnp.where(same, d2, 0.0), axis=1)            # sum_{j in C(m)} ||P_m - P_j||^2
    member = label[None, :] == jnp.arange(n)[:, None]           # [cluster, point]
    return jnp.argmin(jnp.where(member, cost[None, :], jnp.inf), axis=1)
  return jax.vmap(one)(points, labels)


def medoids(points, labels: np.ndarray) -> np.ndarray:
  """int32 [B, N]: entry c of row b is the position of cluster c's medoid (-1: no cluster c)."""
  labels = np.asarray(labels, np.int32)
  out = np.asarray(_medoid_batch(jnp.asarray(points, jnp.float32), jnp.asarray(labels)))
  counts = (labels[:, None, :] == np.arange(labels.shape[1])[None, :, None]).any(axis=2)
  return np.where(counts, out, -1).astype(np.int32)


def importances(labels: np.ndarray, ages_days: np.ndarray, lam: float) -> list[np.ndarray]:
  """Per row, float64 [k]: sum over the cluster's actions of exp(-lam * age in days)."""
  out = []
  for label, age in zip(np.asarray(labels), np.asarray(ages_days, np.float64)):
    valid = label >= 0
    k = int(label[valid].max()) + 1 if valid.any() else 0
    out.append(np.bincount(label[valid], np.exp(-lam * age[valid]), minlength=k))
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


@dataclasses.dataclass
class Clusters:
  """One user's clustering: each action's cluster, each cluster's medoid and importance."""
  labels: np.ndarray       # int32 [n] canonical cluster of each action of the history
  medoids: np.ndarray      # int32 [k] position in the history of each cluster's medoid
  importance: np.ndarray   # float64 [k] sum of exp(-lam * age_days) over the cluster
  sizes: np.ndarray        # int32 [k] actions per cluster


def bucket(n: int, smallest: int = 8) -> int:
  """History lengths are padded to powers of two: one compiled shape per bucket."""
  return max(smallest, 1 << max(n - 1, 0).bit_length())


def users_per_call(n: int, budget: int = 1 << 22, most: int = 128) -> int:
  """Users of one bucket clustered in one call: about `budget` distance entries (16 MiB)."""
  return max(1, min(most, budget // (n * n)))


def cluster_histories(vectors: np.ndarray, histories: list[np.ndarray],
                      ages_days: list[np.ndarray], alpha: float, lam: float,
                      labels: list[np.ndarray] | None = None) -> list[Clusters]:
  """Clusters of every history (rows into `vectors`, each with its actions' ages in days).

  Histories are grouped into length buckets and clustered a batch at a time (padded with empty
  users to a power of two), so the compiled merge loop is reused across calls. With `labels`
  (the online pass), the clustering is given and only medoids and importances are computed.
  """
  vectors = np.asarray(vectors, np.float32)
  out: list[Clusters | None] = [None] * len(histories)
  by_bucket: dict[int, list[int]] = {}
  for u, rows in enumerate(histories):
    by_bucket.setdefault(bucket(len(rows)), []).append(u)
  for n, users in sorted(by_bucket.items()):
    users.sort(key=lambda u: len(histories[u]))   # similar merge counts share a while_loop
    per_call = users_per_call(n)
    for start in range(0, len(users), per_call):
      chunk = users[start:start + per_call]
      rows = min(per_call, bucket(len(chunk), 1))   # a few users are not padded to per_call
      points = np.zeros((rows, n, vectors.shape[1]), np.float32)
      mask = np.zeros((rows, n), bool)
      ages = np.zeros((rows, n))
      given = np.full((rows, n), -1, np.int32)
      for b, u in enumerate(chunk):
        m = len(histories[u])
        points[b, :m] = vectors[histories[u]]
        mask[b, :m] = True
        ages[b, :m] = ages_days[u]
        if labels is not None:
          given[b, :m] = labels[u]
      lab = ward_labels(points, mask, alpha) if labels is None else given
      med = medoids(points, lab)
      imp = importances(lab, ages, lam)
      for b, u in enumerate(chunk):
        m = len(histories[u])
        k = len(imp[b])
        out[u] = Clusters(lab[b, :m].copy(), med[b, :k].copy(), imp[b],
                          np.bincount(lab[b, :m], minlength=k).astype(np.int32))
  return out
