"""Double-hashed n-gram embedding of the pin/product tower (SPEC §1 "Unified pin/product tower").

One table E (hash_rows x dim) is shared by every field and every n-gram kind. Token id i of the
stacked n-gram id space (id 0 = padding, V ids in all) is embedded as

  emb(i) = W[i, 0] * E[h1(i)] + W[i, 1] * E[h2(i)]
  h_k(i) = ((a_k * i + b_k) mod p) mod hash_rows,   p = 2^31 - 1 (a prime >= V)

with W a learned V x 2 table of per-token scalars. a_k, b_k come from `hash_seed`, so the same seed
always gives the same hashing (a checkpoint is only meaningful with the seed it was trained with).

Sharding: E, W and the hash-index table are split by rows over the mesh axis "model" (annotated
P("model", None)); everything else is replicated. The annotations are applied eagerly when a mesh is
active at construction time and are otherwise kept as metadata only, so the module can still be
built on one device (tests, serving) and placed later with `nnx.get_named_sharding`.

Usage:
  emb = HashEmbedding(vocab_size=V, hash_rows=100_000, dim=128, num_fields=8, hash_seed=1234,
                      rngs=rngs)
  fields = emb.field_embeddings(tokens, fields, num_fields=8)   # [B, F, dim]
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HASH_PRIME = 2**31 - 1  # Mersenne prime; a * i < 2^62 so the hashing fits in int64
# Row counts are rounded up to this so they divide any "model" axis size up to 8.
ROW_MULTIPLE = 8
MODEL_ROWS = ("model", None)
FIELD_NORM_EPS = 1e-6  # nnx.LayerNorm's default


class HashIndices(nnx.Variable):
  """The fixed [V, 2] table of (h1(i), h2(i)): state, never trained or seen by the optimiser."""


def round_up(n: int, multiple: int = ROW_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def hash_coefficients(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(a, b), each [2] int64: a_k in [1, p), b_k in [0, p), a_1 != a_2 (so h1 and h2 differ)."""
  rng = np.random.default_rng(seed)
  a = rng.integers(1, HASH_PRIME, size=2, dtype=np.int64)
  while a[0] == a[1]:
    a[1] = rng.integers(1, HASH_PRIME, dtype=np.int64)
  b = rng.integers(0, HASH_PRIME, size=2, dtype=np.int64)
  return a, b


def hash_index_table(vocab_size: int, hash_rows: int, seed: int) -> np.ndarray:
  """[vocab_size, 2] int32 table of h1(i), h2(i), computed in int64 NumPy (no overflow in JAX)."""
  if vocab_size > HASH_PRIME:
    raise ValueError(f"vocab_size {vocab_size} exceeds the hash prime {HASH_PRIME}")
  a, b = hash_coefficients(seed)
  ids = np.arange(vocab_size, dtype=np.int64)[:, None]
  return ((a * ids + b) % HASH_PRIME % hash_rows).astype(np.int32)


def _eager() -> bool:
  # Flax shards annotated variables at creation by default and fails without a mesh; we only ask for
  # it when a mesh is active, and otherwise keep the annotation for later placement.
  return not jax.sharding.get_abstract_mesh().empty


class HashEmbedding(nnx.Module):
  """Shared double-hashed embedding plus the per-field sum and per-field LayerNorm."""

  def __init__(self, *, vocab_size: int, hash_rows: int, dim: int, num_fields: int, hash_seed: int,
               rngs: nnx.Rngs):
    self.vocab_size = vocab_size        # V as given (ids >= V are out of range)
    self.hash_rows = hash_rows          # modulus of the hash functions
    self.dim = dim
    self.num_fields = num_fields
    padded_vocab = round_up(vocab_size)
    eager = _eager()
    # E gets ROW_MULTIPLE-padded rows so it splits evenly; hashes are taken mod hash_rows, so the
    # padding rows are never read and receive no gradient.
    table_init = nnx.with_partitioning(nnx.initializers.normal(dim**-0.5), MODEL_ROWS,
                                       eager_sharding=eager)
    self.table = nnx.Param(table_init(rngs.params(), (round_up(hash_rows), dim)))
    # W starts at 1 so that emb(i) = E[h1] + E[h2]: every token is distinct from the start, and the
    # learned scalars then tell colliding tokens apart (Svenstrup et al. 2017).
    weight_init = nnx.with_partitioning(nnx.initializers.ones, MODEL_ROWS, eager_sharding=eager)
    self.token_weights = nnx.Param(weight_init(rngs.params(), (padded_vocab, 2)))
    self.hash_indices = HashIndices(
        jnp.asarray(hash_index_table(padded_vocab, hash_rows, hash_seed)),
        out_sharding=MODEL_ROWS, eager_sharding=eager)
    # One LayerNorm per field (scale and bias [F, dim]) rather than one shared: a field's LayerNorm
    # is then also its learned weight in the field sum (e.g. engaged queries vs. description).
    self.field_scale = nnx.Param(jnp.ones((num_fields, dim)))
    self.field_bias = nnx.Param(jnp.zeros((num_fields, dim)))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Per-token embeddings [..., dim]; padding (id 0) gives exactly zero."""
    idx = self.hash_indices[...][tokens]                     # [..., 2]
    w = self.token_weights[...][tokens]                      # [..., 2]
    vecs = self.table[...][idx]                              # [..., 2, dim]
    emb = jnp.einsum("...k,...kd->...d", w, vecs)
    return emb * (tokens != 0)[..., None].astype(emb.dtype)

  def field_embeddings(self, tokens: jax.Array, fields: jax.Array, num_fields: int | None = None
                       ) -> jax.Array:
    """Per-field LayerNorm(sum of token embeddings): [B, F, dim].

    tokens, fields: [B, L] int32 (fields = FIELDS index of each token; ignored where tokens == 0).
    An absent field (see `field_present`) gives exactly zero: LayerNorm of a zero sum would
    otherwise contribute its bias.
    """
    num_fields = self.num_fields if num_fields is None else num_fields
    emb = self(tokens)                                                       # [B, L, dim]
    onehot = _field_onehot(tokens, fields, num_fields, emb.dtype)            # [B, L, F]
    sums = jnp.einsum("blf,bld->bfd", onehot, emb)
    present = onehot.sum(axis=1) > 0                                         # [B, F]
    mean = sums.mean(-1, keepdims=True)
    var = jnp.square(sums - mean).mean(-1, keepdims=True)
    normed = (sums - mean) * jax.lax.rsqrt(var + FIELD_NORM_EPS)
    out = normed * self.field_scale[...][:num_fields] + self.field_bias[...][:num_fields]
    return out * present[..., None].astype(out.dtype)

  @staticmethod
  def field_present(tokens: jax.Array, fields: jax.Array, num_fields: int) -> jax.Array:
    """[B, F] bool: the field has at least one non-padding token."""
    return _field_onehot(tokens, fields, num_fields, jnp.float32).sum(axis=1) > 0


def _field_onehot(tokens, fields, num_fields, dtype):
  # one_hot of an out-of-range field id is all zeros: a stray id is dropped, not mis-summed.
  onehot = jax.nn.one_hot(fields, num_fields, dtype=dtype)
  return onehot * (tokens != 0)[..., None].astype(dtype)
