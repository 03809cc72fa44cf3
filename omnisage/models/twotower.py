"""Home-feed two-tower model (SPEC §3): a user tower and an item tower, 64-d, scored by dot product.

User tower (engagement history; inputs from omnisage/data/twotower/examples.py):
  - hashed ids of the last H items -> a double-hashed id embedding (hash_embedding.HashEmbedding,
    the same scheme and P("model", None) row sharding as OmniSearchSage's n-gram table);
  - pooled with time decay: for each of K learned decay times tau_k (initialised from
    `model.decay_days`), weights softmax_j(-age_j / tau_k) over the valid history items, i.e.
    exp(-age / tau) normalised. A softmax is shift-invariant, so the pooling depends on the ages
    relative to the newest item; how long ago that was enters through the user features instead;
  - the history items' genres pooled with the same weights (a genre distribution per tau);
  - user-level dense features (history size, days since the first and the last engagement) and a
    no-history indicator;
  - with `model.user_encoder = "attention"`, also the summary token of a self-attention encoder
    over the history (SequenceEncoder: PinnerFormer, Pancha et al. 2022), which lets the items
    weigh one another instead of by age alone.
Item tower: hashed item-id embedding; genres (multi-hot -> linear = sum of genre embeddings) and
release-year bucket (embedding table); dense features (recent and total popularity); title word
tokens (double-hashed table, mean-pooled).
Each tower: concat -> Linear -> ReLU -> LayerNorm -> Linear(embed_dim) -> L2 normalisation. The
score is the dot product (a cosine); training multiplies it by a learned inverse temperature.

The two towers have separate id tables, so the exported user tower is self-contained.

Usage:
  model = TwoTower(config.model, num_items=N, num_genres=G, title_vocab=V, rngs=nnx.Rngs(0))
  u = model.user_tower(hist_items, hist_age, hist_genres, user_dense)     # [B, 64], unit norm
  v = model.item_tower(item, item_genres, item_year, item_dense, item_title)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.data.twotower.examples import ITEM_DENSE_DIM, NUM_YEAR_BUCKETS, USER_DENSE_DIM
from omnisage.models.compat import l2_normalize
from omnisage.models.hash_embedding import HashEmbedding

MASKED = -1e30


class MLP(nnx.Module):
  def __init__(self, in_dim: int, hidden: int, out_dim: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, out_dim, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(jax.nn.relu(self.hidden(x))))


def _ids(vocab_size: int, cfg, rngs, dim: int, hash_rows: int) -> HashEmbedding:
  # One field: only the per-token embedding is used (not the per-field LayerNorm of
  # field_embeddings), so the [1, dim] field scale/bias stay at their initial values.
  return HashEmbedding(vocab_size=vocab_size, hash_rows=hash_rows, dim=dim, num_fields=1,
                       hash_seed=cfg.hash_seed, rngs=rngs)


class Block(nnx.Module):
  """Pre-LayerNorm transformer encoder block (self-attention + feed-forward, residuals)."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False,
                                            rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ff = MLP(dim, 2 * dim, dim, rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.ff(self.norm2(x))


class SequenceEncoder(nnx.Module):
  """Self-attention over the history (PinnerFormer, Pancha et al. 2022; SASRec, Kang & McAuley
  2018): token = item id + genres + position (recency rank) + log age; a learned summary token is
  prepended and its output is the sequence's summary. Pooling weighs every item by its age only;
  attention lets the items weigh one another (a user's recent items say which older ones still
  matter), which is what a sequence of bulk-rating sessions with near-equal ages needs."""

  def __init__(self, cfg, *, num_genres: int, rngs: nnx.Rngs):
    d = cfg.id_dim
    self.genres = nnx.Linear(num_genres, d, use_bias=False, rngs=rngs)
    self.age = nnx.Linear(1, d, rngs=rngs)
    self.position = nnx.Embed(cfg.max_history, d, rngs=rngs)
    self.summary = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32) * 0.02)
    self.blocks = nnx.List([Block(d, cfg.attention_heads, rngs)
                            for _ in range(cfg.attention_layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, item_vectors, valid, hist_age, hist_genres):
    b, h, d = item_vectors.shape
    x = (item_vectors + self.genres(hist_genres.astype(jnp.float32))
         + self.age(jnp.log1p(jnp.maximum(hist_age, 0.0))[..., None])
         + self.position(jnp.arange(h))[None])
    x = jnp.where(valid[..., None], x, 0.0)
    x = jnp.concatenate([jnp.broadcast_to(self.summary[...], (b, 1, d)), x], axis=1)
    keys = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)   # [B, 1 + H]
    mask = keys[:, None, None, :]                                       # every query, every head
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x[:, 0])


class UserTower(nnx.Module):
  def __init__(self, cfg, *, num_items: int, num_genres: int, rngs: nnx.Rngs):
    self.ids = _ids(num_items + 1, cfg, rngs, cfg.id_dim, cfg.hash_rows)
    self.log_decay = nnx.Param(jnp.log(jnp.asarray(cfg.decay_days, jnp.float32)))
    k = len(cfg.decay_days)
    encoder = cfg.get("user_encoder", "pool")
    if encoder not in ("pool", "attention"):
      raise ValueError(f"config field model.user_encoder={encoder!r}: 'pool' or 'attention'")
    self.sequence = SequenceEncoder(cfg, num_genres=num_genres, rngs=rngs) \
        if encoder == "attention" else None
    # + 1: a "no history" indicator, so a cold-start user's input is not all zeros (which an
    # MLP with zero-initialised biases would map to the zero vector).
    in_dim = k * (cfg.id_dim + num_genres) + USER_DENSE_DIM + 1
    in_dim += cfg.id_dim if self.sequence is not None else 0
    self.mlp = MLP(in_dim, cfg.mlp_hidden, cfg.embed_dim, rngs)

  def __call__(self, hist_items, hist_age, hist_genres, user_dense):
    """hist_items [B, H] int32 (0 = padding), hist_age [B, H] days, hist_genres [B, H, G],
    user_dense [B, 3] -> [B, embed_dim] unit vectors."""
    valid = hist_items != 0
    tau = jnp.exp(self.log_decay[...])                                    # [K]
    logits = -hist_age[..., None] / tau                                   # [B, H, K]
    logits = jnp.where(valid[..., None], logits, MASKED)
    # No history at all: the softmax is uniform over padding; the mask makes the pool exactly 0.
    weights = jax.nn.softmax(logits, axis=1) * valid[..., None]
    item_vectors = self.ids(hist_items)                                  # [B, H, id_dim]
    pooled_ids = jnp.einsum("bhk,bhd->bkd", weights, item_vectors)
    pooled_genres = jnp.einsum("bhk,bhg->bkg", weights, hist_genres.astype(weights.dtype))
    b = hist_items.shape[0]
    parts = [pooled_ids.reshape(b, -1), pooled_genres.reshape(b, -1),
             user_dense.astype(weights.dtype),
             1.0 - valid.any(axis=1, keepdims=True).astype(weights.dtype)]
    if self.sequence is not None:
      parts.append(self.sequence(item_vectors, valid, hist_age, hist_genres))
    return l2_normalize(self.mlp(jnp.concatenate(parts, axis=-1)))


class ItemTower(nnx.Module):
  def __init__(self, cfg, *, num_items: int, num_genres: int, title_vocab: int, rngs: nnx.Rngs):
    self.ids = _ids(num_items + 1, cfg, rngs, cfg.id_dim, cfg.hash_rows)
    self.title = _ids(title_vocab + 1, cfg, rngs, cfg.title_dim, cfg.title_hash_rows)
    self.genres = nnx.Linear(num_genres, cfg.genre_dim, use_bias=False, rngs=rngs)
    self.year = nnx.Embed(NUM_YEAR_BUCKETS, cfg.year_dim, rngs=rngs)
    in_dim = cfg.id_dim + cfg.title_dim + cfg.genre_dim + cfg.year_dim + ITEM_DENSE_DIM
    self.mlp = MLP(in_dim, cfg.mlp_hidden, cfg.embed_dim, rngs)

  def __call__(self, item, item_genres, item_year, item_dense, item_title):
    """item [B] int32, item_genres [B, G], item_year [B] int32, item_dense [B, 2],
    item_title [B, T] int32 (0 = padding) -> [B, embed_dim] unit vectors."""
    tokens = self.title(item_title)                                        # [B, T, title_dim]
    count = jnp.maximum((item_title != 0).sum(axis=1, keepdims=True), 1)
    x = jnp.concatenate([self.ids(item), tokens.sum(axis=1) / count,
                         self.genres(item_genres.astype(jnp.float32)), self.year(item_year),
                         item_dense.astype(jnp.float32)], axis=-1)
    return l2_normalize(self.mlp(x))


class TwoTower(nnx.Module):
  def __init__(self, cfg, *, num_items: int, num_genres: int, title_vocab: int,
               temperature_init: float, rngs: nnx.Rngs):
    self.user_tower = UserTower(cfg, num_items=num_items, num_genres=num_genres, rngs=rngs)
    self.item_tower = ItemTower(cfg, num_items=num_items, num_genres=num_genres,
                                title_vocab=title_vocab, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.asarray(temperature_init, jnp.float32))


USER_INPUTS = ("hist_items", "hist_age", "hist_genres", "user_dense")
ITEM_INPUTS = ("item", "item_genres", "item_year", "item_dense", "item_title")
