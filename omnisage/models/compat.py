"""Frozen compatibility "encoders" and the safe L2 normalisation all towers share (SPEC §1).

The compatibility tasks score the learned query vector against the pre-existing, frozen PinSage
(pins) and ItemSage (products) vectors, so the new query embedding also works against the old
indexes. The "encoder" of such a task is a lookup of the stored legacy vector, L2-normalised;
nothing is trained, so there are no parameters here. The query side uses only the first
`compat_dim` dimensions of the query embedding, renormalised (the official code uses the first
256 dims).

A missing legacy vector is zero-filled upstream and stays exactly zero here (no NaN); the loss must
mask such pairs rather than rely on their score.

Usage:
  q = compat_query(query_emb, compat_dim=256);  p = legacy_embedding(batch["legacy"])
"""

import jax
import jax.numpy as jnp

EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = EPS) -> jax.Array:
  """x / ||x||, with zero vectors mapped to zero and finite gradients everywhere."""
  # max() before rsqrt: at x == 0 the norm branch is not selected, so its (infinite) derivative
  # never enters the gradient.
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def legacy_embedding(vectors: jax.Array) -> jax.Array:
  """Frozen PinSage / ItemSage encoder: the stored [B, 256] vectors, L2-normalised."""
  return l2_normalize(jax.lax.stop_gradient(jnp.asarray(vectors, jnp.float32)))


def compat_query(query_emb: jax.Array, compat_dim: int) -> jax.Array:
  """The first compat_dim dims of a query embedding, renormalised (to score legacy vectors)."""
  if compat_dim > query_emb.shape[-1]:
    raise ValueError(f"compat_dim {compat_dim} > query embedding dim {query_emb.shape[-1]}")
  return l2_normalize(query_emb[..., :compat_dim])
