"""Unified pin/product tower of OmniSearchSage (SPEC §1 "Unified pin/product tower").

Pins and products share one tower: the double-hashed n-gram embedding of every text field
(per-field sum then LayerNorm, see hash_embedding.py), the fields summed, concatenated with the
continuous features [PinSage 256 | ItemSage 256 | visual 1024] (the caller zero-fills what an entity
lacks), then an MLP hidden -> hidden -> embed_dim with ReLU + LayerNorm on the hidden layers, and L2
normalisation.

Usage:
  tower = EntityTower(vocab_size=V, hash_rows=100_000, text_dim=128, num_fields=8,
                      continuous_dim=1536, mlp_hidden=1024, embed_dim=256, hash_seed=1234,
                      rngs=nnx.Rngs(0))
  emb = tower(tokens, fields, continuous)   # [B, 256], unit norm (zero only if everything is empty)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.data.schema import LEGACY_DIM, VISUAL_DIM
from omnisage.models.compat import l2_normalize
from omnisage.models.hash_embedding import HashEmbedding

CONTINUOUS_DIM = 2 * LEGACY_DIM + VISUAL_DIM  # [pinsage | itemsage | visual]


class EntityTower(nnx.Module):

  def __init__(self, *, vocab_size: int, hash_rows: int, text_dim: int, num_fields: int,
               continuous_dim: int = CONTINUOUS_DIM, mlp_hidden: int, embed_dim: int,
               hash_seed: int, rngs: nnx.Rngs):
    self.num_fields = num_fields
    self.continuous_dim = continuous_dim
    self.hash = HashEmbedding(vocab_size=vocab_size, hash_rows=hash_rows, dim=text_dim,
                              num_fields=num_fields, hash_seed=hash_seed, rngs=rngs)
    self.hidden1 = nnx.Linear(text_dim + continuous_dim, mlp_hidden, rngs=rngs)
    self.norm1 = nnx.LayerNorm(mlp_hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(mlp_hidden, mlp_hidden, rngs=rngs)
    self.norm2 = nnx.LayerNorm(mlp_hidden, rngs=rngs)
    self.out = nnx.Linear(mlp_hidden, embed_dim, rngs=rngs)

  def __call__(self, tokens: jax.Array, fields: jax.Array, continuous: jax.Array) -> jax.Array:
    """tokens, fields: [B, L] int32; continuous: [B, continuous_dim] -> [B, embed_dim], unit."""
    text = self.hash.field_embeddings(tokens, fields, self.num_fields).sum(axis=1)   # [B, text_dim]
    x = jnp.concatenate([text, continuous.astype(text.dtype)], axis=-1)
    x = self.norm1(jax.nn.relu(self.hidden1(x)))
    x = self.norm2(jax.nn.relu(self.hidden2(x)))
    return l2_normalize(self.out(x))
