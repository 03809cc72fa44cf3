"""PinText's margin (hinge) loss with random negatives, and the norm-radius projection (SPEC §2).

For a query q with positive p+ and rho random background items p-_1..p-_rho:

  loss(q) = (1 / rho) * sum_j  mask_j * max(0, mu - cos(q, p+) + cos(q, p-_j))

and a task's objective is the mean of loss(q) over its batch rows; the multitask objective is the
sum of the task objectives. mask_j removes "accidental hits" (a negative that IS the positive
item); the sum is still divided by rho so that a row's weight never depends on its luck in
sampling. cos of a zero vector (an entity with no known word) is 0, not NaN.

The radius gamma keeps every word vector inside the ball ||v|| <= gamma, as StarSpace's `-norm`
(the toolkit PinText builds on) does: after each optimiser update the rows that left the ball are
scaled back onto it (`project_to_ball`). With cosine scores the radius does not change a single
entity's direction, but it bounds how much one word can dominate an average of words.

Usage:
  loss, metrics = hinge_loss(q, pos, neg, margin=0.2, neg_mask=valid)   # q [B,d], neg [B,rho,d]
  table = project_to_ball(table, radius=1.0)
"""

import jax.numpy as jnp

EPS = 1e-8


def cosine(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """cos along the last axis (broadcasting); 0 when either side is the zero vector."""
  dot = jnp.sum(a * b, axis=-1)
  # max INSIDE the sqrt: sqrt'(0) is infinite, and a zero vector would give NaN gradients.
  squared = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
  return dot / jnp.sqrt(jnp.maximum(squared, EPS * EPS))


def hinge_loss(q: jnp.ndarray, pos: jnp.ndarray, neg: jnp.ndarray, margin: float,
               neg_mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
  """q, pos [B, d]; neg [B, rho, d]; neg_mask bool [B, rho] (False: accidental hit).

  Returns (mean over rows of the per-row loss, metrics): `active` is the share of valid
  (row, negative) terms inside the margin (the ones that still give gradient), `pos_cos` and
  `neg_cos` the mean cosines.
  """
  rho = neg.shape[1]
  pos_cos = cosine(q, pos)                       # [B]
  neg_cos = cosine(q[:, None, :], neg)           # [B, rho]
  terms = jnp.maximum(0.0, margin - pos_cos[:, None] + neg_cos)
  valid = jnp.ones_like(terms, bool) if neg_mask is None else neg_mask
  terms = jnp.where(valid, terms, 0.0)
  loss = jnp.mean(jnp.sum(terms, axis=1) / rho)
  n_valid = jnp.maximum(jnp.sum(valid), 1)
  metrics = {"active": jnp.sum(valid & (terms > 0)) / n_valid, "pos_cos": jnp.mean(pos_cos),
             "neg_cos": jnp.sum(jnp.where(valid, neg_cos, 0.0)) / n_valid}
  return loss, metrics


def project_to_ball(table: jnp.ndarray, radius: float) -> jnp.ndarray:
  """Rows with ||v|| > radius scaled onto the sphere of that radius; radius <= 0: unchanged."""
  if radius <= 0:
    return table
  norms = jnp.sqrt(jnp.sum(table * table, axis=-1, keepdims=True))
  return table * jnp.minimum(1.0, radius / jnp.maximum(norms, EPS))
