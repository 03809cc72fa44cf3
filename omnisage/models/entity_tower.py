"""Unified pin/product tower of OmniSearchSage (SPEC §1 "Unified pin/product tower").

Pins and products share one tower: the double-hashed n-gram embedding of every text field
(per-field sum then LayerNorm, see hash_embedding.py), the fields summed, concatenated with the
continuous features [PinSage 256 | ItemSage 256 | visual 1024] (the caller zero-fills what an entity
lacks), then an MLP hidden -> hidden -> embed_dim with ReLU + LayerNorm on the hidden layers, and L2
normalisation.

`legacy_skip=True` (beyond the paper, for small data) adds a linear path from the entity's legacy
vector (PinSage or ItemSage slice of the continuous features) straight to the output,
initialised to the identity, with the MLP's output layer initialised to zero: training then starts
from the legacy embedding space (a pretrained model's quality) instead of a random one, and the
MLP learns a correction on top of it.

`lexical_channel` (set by the model that owns both towers, see lexical_path.LexicalChannel) makes
the output [dense | lexical]: the title field's n-gram vector through the map the query tower
shares.

Usage:
  tower = EntityTower(vocab_size=V, hash_rows=100_000, text_dim=128, num_fields=8,
                      continuous_dim=1536, mlp_hidden=1024, embed_dim=256, hash_seed=1234,
                      rngs=nnx.Rngs(0))
  emb = tower(tokens, fields, continuous)   # [B, 256], unit norm (zero only if everything is empty)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.data.omnisearchsage.schema import FIELDS, LEGACY_DIM, VISUAL_DIM
from omnisage.models.compat import l2_normalize
from omnisage.models.hash_embedding import HashEmbedding

CONTINUOUS_DIM = 2 * LEGACY_DIM + VISUAL_DIM  # [pinsage | itemsage | visual]
TITLE_FIELD = FIELDS.index("title")


class EntityTower(nnx.Module):

  def __init__(self, *, vocab_size: int, hash_rows: int, text_dim: int, num_fields: int,
               continuous_dim: int = CONTINUOUS_DIM, mlp_hidden: int, embed_dim: int,
               hash_seed: int, rngs: nnx.Rngs, legacy_skip: bool = False):
    self.num_fields = num_fields
    self.continuous_dim = continuous_dim
    self.hash = HashEmbedding(vocab_size=vocab_size, hash_rows=hash_rows, dim=text_dim,
                              num_fields=num_fields, hash_seed=hash_seed, rngs=rngs)
    self.hidden1 = nnx.Linear(text_dim + continuous_dim, mlp_hidden, rngs=rngs)
    self.norm1 = nnx.LayerNorm(mlp_hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(mlp_hidden, mlp_hidden, rngs=rngs)
    self.norm2 = nnx.LayerNorm(mlp_hidden, rngs=rngs)
    if legacy_skip:
      if continuous_dim != CONTINUOUS_DIM:
        raise ValueError("legacy_skip needs the [pinsage | itemsage | visual] continuous layout")
      self.out = nnx.Linear(mlp_hidden, embed_dim, kernel_init=nnx.initializers.zeros,
                            rngs=rngs)
      eye = lambda key, shape, dtype=jnp.float32: jnp.eye(*shape, dtype=dtype)
      self.legacy_skip = nnx.Linear(LEGACY_DIM, embed_dim, use_bias=False, kernel_init=eye,
                                    rngs=rngs)
    else:
      self.out = nnx.Linear(mlp_hidden, embed_dim, rngs=rngs)
      self.legacy_skip = None
    self.lexical_channel = None   # shared with the query tower: attached by the owning model

  def __call__(self, tokens: jax.Array, fields: jax.Array, continuous: jax.Array) -> jax.Array:
    """tokens, fields: [B, L] int32; continuous: [B, continuous_dim] -> [B, embed_dim], unit."""
    per_field = self.hash.field_embeddings(tokens, fields, self.num_fields)   # [B, F, text_dim]
    text = per_field.sum(axis=1)
    x = jnp.concatenate([text, continuous.astype(text.dtype)], axis=-1)
    x = self.norm1(jax.nn.relu(self.hidden1(x)))
    x = self.norm2(jax.nn.relu(self.hidden2(x)))
    y = self.out(x)
    if self.legacy_skip is not None:
      # An entity has at most one legacy vector (pins PinSage, products ItemSage); the other
      # slice is zero, so their sum is the entity's own.
      legacy = continuous[:, :LEGACY_DIM] + continuous[:, LEGACY_DIM:2 * LEGACY_DIM]
      y = y + self.legacy_skip(l2_normalize(legacy.astype(y.dtype)))
    if self.lexical_channel is not None:
      return self.lexical_channel(y, per_field[:, TITLE_FIELD])
    return l2_normalize(y)
