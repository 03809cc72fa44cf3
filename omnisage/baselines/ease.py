"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): item-item
weights B from one closed-form ridge regression of every item's column on the others.

  G = X^T X + lambda I,   P = G^-1,   B = I - P diag(1 / diag(P)),   so diag(B) = 0
  scores(u) = x_u B

X is the binary user x item matrix of the training engagements. One dense solve of an
items x items matrix: about 9.7k x 9.7k for MovieLens latest-small (0.75 GB in float64), a strong
baseline on MovieLens-sized data that learned models often fail to beat.

Usage:
  b = ease_weights(x, lam=500.0)       # x: scipy.sparse or dense [users, items]
  scores = history_matrix @ b          # [U, items]
"""

import numpy as np


def ease_weights(x, lam: float = 500.0) -> np.ndarray:
  """[items, items] float64 B of the EASE closed form (zero diagonal)."""
  if lam <= 0:
    raise ValueError(f"EASE needs lambda > 0, got {lam}")
  gram = x.T @ x
  gram = np.asarray(gram.todense() if hasattr(gram, "todense") else gram, np.float64)
  gram[np.diag_indices_from(gram)] += lam
  p = np.linalg.inv(gram)
  b = -p / np.diag(p)[None, :]
  b[np.diag_indices_from(b)] = 0.0
  return b
