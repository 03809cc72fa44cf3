"""Query tower of OmniSearchSage: a BERT-family encoder with CLS pooling (SPEC §1 "Query tower").

Token + position (+ token-type, BERT only) embeddings, LayerNorm, then N post-LN transformer layers
(self-attention -> add & LayerNorm -> exact-erf GELU feed-forward -> add & LayerNorm), the layout
shared by BERT and DistilBERT, so both import into it (hf_import.py). Padding id 0 is masked out
of attention. The query embedding is the final hidden state at position 0 ([CLS], the paper's
choice), or the masked mean of the hidden states (`pooling="mean"`, how sentence-transformers
checkpoints such as all-MiniLM-L6-v2 were trained, so fine-tuning starts from their geometry), then
one linear projection to embed_dim, L2-normalised. There is no dropout: the trainer runs the model
deterministically.

`frozen_layers = k > 0` freezes the embeddings and the first k layers of a pretrained encoder: a
stop_gradient after layer k means the backward pass runs through the top layers only (the
optimizer gives the frozen weights no update, train/state.py), a standard partial fine-tune that
makes a 6-layer MiniLM trainable in minutes on a CPU.

Usage:
  tower = QueryTower(QueryConfig(vocab_size=8000, hidden=256, layers=2, heads=4, intermediate=1024,
                                 max_len=64, embed_dim=256), rngs=nnx.Rngs(0))
  q = tower(tokens)   # [B, 256] unit vectors; tokens [B, L] int32, 0 = padding
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from omnisage.models.compat import l2_normalize


@dataclasses.dataclass(frozen=True)
class QueryConfig:
  vocab_size: int
  hidden: int
  layers: int
  heads: int
  intermediate: int
  max_len: int              # number of position embeddings
  embed_dim: int            # output dim after the projection head
  type_vocab_size: int = 0  # BERT token types (only type 0 is used); 0: no token-type embeddings
  layer_norm_eps: float = 1e-12  # BERT / DistilBERT value
  pooling: str = "cls"      # "cls" or "mean"
  frozen_layers: int = 0    # freeze embeddings + this many bottom layers (0: train everything)
  lexical_len: int = 0      # n-gram ids packed after the WordPiece ids (lexical_path.py); 0: none

  def __post_init__(self):
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling {self.pooling!r} is not 'cls' or 'mean'")
    if self.lexical_len < 0:
      raise ValueError(f"lexical_len {self.lexical_len} is negative")
    if not 0 <= self.frozen_layers <= self.layers:
      raise ValueError(f"frozen_layers {self.frozen_layers} is not in 0..{self.layers}")


def _normal(rngs):
  # BERT's initializer_range.
  return dict(kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class TransformerLayer(nnx.Module):
  """One post-LN encoder layer (BERT `encoder.layer.N`, DistilBERT `transformer.layer.N`)."""

  def __init__(self, c: QueryConfig, rngs: nnx.Rngs):
    if c.hidden % c.heads:
      raise ValueError(f"hidden {c.hidden} is not divisible by heads {c.heads}")
    self.heads = c.heads
    self.query = nnx.Linear(c.hidden, c.hidden, **_normal(rngs))
    self.key = nnx.Linear(c.hidden, c.hidden, **_normal(rngs))
    self.value = nnx.Linear(c.hidden, c.hidden, **_normal(rngs))
    self.attn_out = nnx.Linear(c.hidden, c.hidden, **_normal(rngs))
    self.attn_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)
    self.ffn_in = nnx.Linear(c.hidden, c.intermediate, **_normal(rngs))
    self.ffn_out = nnx.Linear(c.intermediate, c.hidden, **_normal(rngs))
    self.ffn_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, H]; mask: [B, L] bool (True = real token)."""
    b, l, h = x.shape
    split = lambda t: t.reshape(b, l, self.heads, h // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(h // self.heads).astype(x.dtype)
    # A large finite negative rather than -inf: an all-padding row gets uniform weights, not NaN.
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    attn = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(logits, axis=-1), v).reshape(b, l, h)
    x = self.attn_norm(x + self.attn_out(attn))
    y = self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))
    return self.ffn_norm(x + y)


class QueryTower(nnx.Module):

  def __init__(self, config: QueryConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Embed(c.vocab_size, c.hidden, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(c.max_len, c.hidden, embedding_init=init, rngs=rngs)
    self.token_type_embeddings = (
        nnx.Embed(c.type_vocab_size, c.hidden, embedding_init=init, rngs=rngs)
        if c.type_vocab_size else None)
    self.embed_norm = nnx.LayerNorm(c.hidden, epsilon=c.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([TransformerLayer(c, rngs) for _ in range(c.layers)])
    self.projection = nnx.Linear(c.hidden, c.embed_dim, rngs=rngs)
    # The lexical path (lexical_path.LexicalPath) shares the entity tower's hash table, so the
    # model that owns both attaches it: `tower.lexical = nnx.data(LexicalPath(...))`.
    self.lexical = None

  def encode(self, tokens: jax.Array) -> jax.Array:
    """Final hidden states [B, L, H] of tokens [B, L] (0 = padding, attended by nothing)."""
    if tokens.shape[-1] > self.config.max_len:
      raise ValueError(f"sequence length {tokens.shape[-1]} > max_len {self.config.max_len}")
    mask = tokens != 0
    x = self.word_embeddings(tokens) + self.position_embeddings.embedding[...][:tokens.shape[-1]]
    if self.token_type_embeddings is not None:
      # Single-segment input: token type 0 everywhere.
      x = x + self.token_type_embeddings.embedding[...][0]
    x = self.embed_norm(x)
    for i, layer in enumerate(self.layers):
      if i == self.config.frozen_layers and i:
        x = jax.lax.stop_gradient(x)  # nothing below this point is trained
      x = layer(x, mask)
    if self.config.frozen_layers == len(self.layers) and self.config.frozen_layers:
      x = jax.lax.stop_gradient(x)
    return x

  def mean_pooled(self, tokens: jax.Array) -> jax.Array:
    """Masked mean of the hidden states [B, H] (sentence-transformers' pooling; checks imports)."""
    mask = (tokens != 0)[..., None].astype(jnp.float32)
    h = self.encode(tokens)
    return (h * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Query embeddings [B, embed_dim]: pooled state, linear projection (plus the lexical path's
    output when config.lexical_len > 0: tokens are then [B, Lq + lexical_len]), L2 normalisation."""
    lexical_len = self.config.lexical_len
    if lexical_len:
      if self.lexical is None:
        raise ValueError("lexical_len > 0 but no lexical path is attached")
      tokens, ngram_ids = tokens[:, :-lexical_len], tokens[:, -lexical_len:]
    if self.config.pooling == "mean":
      pooled = self.mean_pooled(tokens)
    else:
      pooled = self.encode(tokens)[:, 0]
    y = self.projection(pooled)
    if lexical_len:
      y = self.lexical.combine(y, ngram_ids)
    return l2_normalize(y)
