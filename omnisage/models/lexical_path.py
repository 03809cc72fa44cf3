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

Input layout: a lexical query tower takes ONE int32 array [B, Lq + Ll], the WordPiece ids
padded to Lq followed by the n-gram ids padded to Ll (`omnisage.data.omnisearchsage.query_input`
packs it), so every caller, the export and the serving cache key stay single-array.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.data.omnisearchsage.schema import FIELDS
from omnisage.models.hash_embedding import HashEmbedding

TITLE_FIELD = FIELDS.index("title")


class LexicalPath(nnx.Module):

  def __init__(self, hash_embedding: HashEmbedding, embed_dim: int, rngs: nnx.Rngs):
    self.hash = nnx.data(hash_embedding)   # shared with the entity tower
    self.projection = nnx.Linear(hash_embedding.dim, embed_dim, use_bias=False,
                                 kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, ngram_ids: jax.Array) -> jax.Array:
    """ngram_ids [B, Ll] int32 (0 = padding) -> [B, embed_dim] (zero for a query with none)."""
    fields = jnp.full(ngram_ids.shape, TITLE_FIELD, jnp.int32)
    title = self.hash.field_embeddings(ngram_ids, fields)[:, TITLE_FIELD]   # [B, text_dim]
    return self.projection(title)
