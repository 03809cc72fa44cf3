"""The query tower's lexical path: the query's n-grams through the entity tower's hash table.

Huang et al. (KDD 2020, "Embedding-based Retrieval in Facebook Search") put exact term matching
into a two-tower model by giving BOTH towers character-trigram features. Here the query's
character trigrams, unigrams and bigrams are tokenised exactly as an entity title is (the same
`text.NgramVocab`, prepared once), embedded through the SAME double-hashed table E and token
weights W as the pin/product tower (`HashEmbedding`, shared, not copied: a gradient from either
tower moves both), summed and LayerNorm-ed like an entity's title field, and projected to the
output space. The tower output is `projection(pooled transformer state) + lexical(ngrams)` —
concatenate-then-project written as a sum of the two blocks. The lexical block starts at zero,
so a pretrained query tower scores exactly as before at step 0 and learns how much exact
matching to add.

`model.lexical_dim > 0` replaces the additive block with a LEXICAL CHANNEL (`LexicalChannel`):
both towers send their title n-gram vector (the query's, and the entity's title field, through the
same table) through ONE shared projection, and each tower's output is the concatenation
[sqrt(1 - w) * dense, sqrt(w) * lexical] of the two unit vectors. The score of a pair is then
(1 - w) cos(dense) + w cos(lexical): the weighted-sum fusion of hybrid retrieval learned inside one
embedding, so a single ANN index serves it. The projection starts orthogonal, so at step 0 the
lexical cosine is the cosine of the hashed n-gram bags (an overlap score, as character-trigram
matching in Huang et al.); the weight w (one learned scalar, `model.lexical_weight` at the start)
and the projection train with the rest. Unlike the additive block there are no cross terms between
a tower's dense part and the other tower's n-grams.

Input layout: a lexical query tower takes ONE int32 array [B, Lq + Ll], the WordPiece ids
padded to Lq followed by the n-gram ids padded to Ll (`omnisage.data.omnisearchsage.query_input`
packs it), so every caller, the export and the serving cache key stay single-array.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.models.compat import l2_normalize
from omnisage.models.entity_tower import TITLE_FIELD
from omnisage.models.hash_embedding import HashEmbedding


class LexicalChannel(nnx.Module):
  """The shared lexical map of both towers and the learned fusion weight (see the module doc)."""

  def __init__(self, text_dim: int, lexical_dim: int, weight: float, rngs: nnx.Rngs):
    if not 0.0 < weight < 1.0:
      raise ValueError(f"model.lexical_weight must be in (0, 1), got {weight}")
    self.projection = nnx.Linear(text_dim, lexical_dim, use_bias=False,
                                 kernel_init=nnx.initializers.orthogonal(), rngs=rngs)
    self.mix = nnx.Param(jnp.log(jnp.asarray(weight / (1.0 - weight), jnp.float32)))

  @property
  def weight(self) -> jax.Array:
    """w: the lexical cosine's share of the score."""
    return jax.nn.sigmoid(self.mix[...])

  def __call__(self, dense: jax.Array, title: jax.Array) -> jax.Array:
    """dense [B, D] (any norm), title [B, text_dim] -> unit [B, D + lexical_dim]. A row without
    n-grams (a title-less pin, a query of symbols) has a zero lexical half and a unit dense one,
    so every embedding stays unit norm."""
    w = self.weight.astype(dense.dtype)
    return l2_normalize(jnp.concatenate([jnp.sqrt(1.0 - w) * l2_normalize(dense),
                                         jnp.sqrt(w) * l2_normalize(self.projection(title))],
                                        axis=-1))


class LexicalPath(nnx.Module):

  def __init__(self, hash_embedding: HashEmbedding, embed_dim: int, rngs: nnx.Rngs,
               channel: LexicalChannel | None = None):
    self.hash = nnx.data(hash_embedding)   # shared with the entity tower
    self.channel = nnx.data(channel)       # shared with the entity tower too, when set
    self.projection = None if channel is not None else nnx.Linear(
        hash_embedding.dim, embed_dim, use_bias=False, kernel_init=nnx.initializers.zeros,
        rngs=rngs)

  def title(self, ngram_ids: jax.Array) -> jax.Array:
    """ngram_ids [B, Ll] int32 (0 = padding) -> the title-field vector [B, text_dim]."""
    fields = jnp.full(ngram_ids.shape, TITLE_FIELD, jnp.int32)
    return self.hash.field_embeddings(ngram_ids, fields)[:, TITLE_FIELD]

  def combine(self, dense: jax.Array, ngram_ids: jax.Array) -> jax.Array:
    """The query's output before the final normalisation: dense + the additive block, or the
    channel's [dense | lexical] concatenation (already unit)."""
    if self.channel is not None:
      return self.channel(dense, self.title(ngram_ids))
    return dense + self.projection(self.title(ngram_ids))

  def __call__(self, ngram_ids: jax.Array) -> jax.Array:
    """The additive block [B, embed_dim] (zero for a query with no n-grams)."""
    return self.projection(self.title(ngram_ids))
