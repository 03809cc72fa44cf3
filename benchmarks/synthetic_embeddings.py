"""Clustered synthetic embeddings for the retrieval benchmark (SPEC §1 "Serving").

Isotropic Gaussian noise is the worst case for any ANN index and nothing like real embeddings,
which form topical clusters of very different sizes, each spread along a few directions. This
draws vectors from such a process:

- C cluster centres (C ~ N / 250, at most 4000) with an anisotropic global spectrum (variance of
  direction i ~ (i + 1) ** -0.5) in a random rotation, L2-normalised;
- power-law cluster sizes (P(cluster of rank r) ~ r ** -0.8: a few big topics, a long tail);
- within a cluster, a low-rank spread (8-16 private directions with decaying scales, the cluster's
  own width drawn log-normally) plus a little isotropic noise; every vector is L2-normalised.

Queries come from the same process (fresh cluster draws and offsets), never copies of database
rows. Generation is cluster by cluster straight into one preallocated float32 array, so 1M x 256
takes ~1 GB and seconds.

Usage: `database, queries = clustered_embeddings(1_000_000, 256, num_queries=2000, seed=0)`.
"""

import numpy as np


def clustered_embeddings(rows: int, dim: int, num_queries: int, seed: int = 0,
                         num_clusters: int | None = None,
                         noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """(database float32 [rows, dim], queries float32 [num_queries, dim]), unit-norm rows."""
  if rows < 1 or dim < 2 or num_queries < 0:
    raise ValueError(f"need rows >= 1, dim >= 2, num_queries >= 0; got {rows}, {dim}, "
                     f"{num_queries}")
  rng = np.random.default_rng(seed)
  c = num_clusters or int(np.clip(rows // 250, 8, 4000))
  spectrum = (np.arange(dim) + 1.0) ** -0.25   # std, so variance ~ (i + 1) ** -0.5
  rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  centres = (rng.standard_normal((c, dim)) * spectrum) @ rotation
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  weights = (np.arange(c) + 1.0) ** -0.8
  weights /= weights.sum()
  rank = rng.integers(8, 17, size=c)                      # private directions per cluster
  width = 0.45 * np.exp(0.3 * rng.standard_normal(c))    # cluster spread, log-normal
  noise = noise / np.sqrt(dim)                            # isotropic, per coordinate

  total = rows + num_queries
  out = np.empty((total, dim), np.float32)
  assignment = rng.choice(c, size=total, p=weights)
  order = np.argsort(assignment, kind="stable")
  bounds = np.searchsorted(assignment[order], np.arange(c + 1))
  for cluster in range(c):
    members = order[bounds[cluster]:bounds[cluster + 1]]
    if len(members) == 0:
      continue
    r = rank[cluster]
    basis = rng.standard_normal((r, dim)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    scales = (width[cluster] * 0.8 ** np.arange(r) / np.sqrt(r)).astype(np.float32)
    z = rng.standard_normal((len(members), r), dtype=np.float32) * scales
    block = z @ basis
    block += centres[cluster].astype(np.float32)
    block += noise * rng.standard_normal(block.shape, dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    out[members] = block
  return out[:rows], out[rows:].copy()
