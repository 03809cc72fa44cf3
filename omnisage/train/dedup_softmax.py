"""The in-batch softmax over DISTINCT queries and candidates: the same loss, fewer logits.

In recommendation logs popular users and items repeat within a batch (Zipf), so a batch holds far
fewer distinct users and items than rows (counts for benchmarks/vs_tfrs.py's data in
docs/performance.md). The in-batch softmax with accidental hits removed (TFRS
`Retrieval(remove_accidental_hits=True)`, and `losses.sampled_softmax_rows`) depends on a row only
through its query's embedding and its positive's, so it can be computed exactly from the [G, U]
logits of the G distinct queries and U distinct candidates instead of the [B, B] logits of the
rows:

  L[g, u]   = s * cos(Q_g, C_u) - b_u                       b_u: log Q of the candidate (logQ)
  row i     = (query g_i, positive u_i); column j of row i is dropped when u_j == u_i (accidental
              hit, the row's own column included) or, with mask_same_query, when g_j == g_i
  CE_i      = log(exp(L[g_i, u_i]) + sum over kept columns j of exp(L[g_i, u_j])) - L[g_i, u_i]
            = log(exp(P_i) + S_g - X_i) - P_i,  with P_i = L[g_i, u_i],
  S_g       = sum_u n_u exp(L[g, u]) - [mask_same_query] sum_{rows k of g} exp(L[g, u_k])
  X_i       = (n_{u_i} - [mask_same_query] m_i) exp(P_i)    (the column weight of u_i left in S_g)
where n_u counts the rows whose positive is u and m_i the rows with row i's (query, positive)
pair. S_g is a matrix-vector product over [G, U] plus a segment sum over B rows; everything per row
is O(B). The gradients follow by autodiff through the same expressions; candidates repeated n_u
times get the summed gradient of their n_u columns, as in the [B, B] form.

Rounding: S_g - X_i subtracts the duplicates of the row's positive from the sum that holds them.
The positive's value is read from the same [G, U] logits that went into the sum, so what is left
is the sum's own rounding, ~eps * S_g <= ~n_{u_i} * eps * Z_i: with the row max M_g factored
out, CE_i's absolute error stays within ~(n_{u_i} + 1) float32 eps. tests/test_dedup_softmax.py
checks loss and gradients against `losses.sampled_softmax_loss` on the expanded rows, and a
NumPy loop with one candidate in 80% of the rows.

The distinct ids must be found outside jit (their number sets the shapes): `dedup_rows` does it in
NumPy on the host, padding G and U up to a multiple of `pad_multiple` so that a handful of shapes
are compiled; padded queries have no rows and padded candidates have n_u = 0 (and are masked).

Usage:
  d = dedup_rows(users, items, pad_multiple=256)                       # host, per batch
  q = user_tower(d.query_keys); c = item_tower(d.cand_keys)            # towers on distinct ids
  loss = dedup_inbatch_softmax_loss(q, c, scale=20.0, col_bias=zeros, row_query=d.row_query,
                                    row_cand=d.row_cand, cand_count=d.cand_count)
  # with mask_same_query=True, also pair_count=d.pair_count
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from omnisage.train.losses import MASKED_LOGIT


@dataclasses.dataclass(frozen=True)
class DedupRows:
  """A batch of B (query, candidate) rows as distinct keys plus per-row indices (NumPy).

  query_keys [G_pad], cand_keys [U_pad]: the distinct keys, sorted, padded by repeating the first.
  row_query [B], row_cand [B] int32: each row's index into them.
  cand_count [U_pad] int32: rows whose candidate is this one (0 on padding).
  pair_count [B] int32: rows with this row's (query, candidate) pair.
  num_queries, num_cands: G and U before padding.
  """
  query_keys: np.ndarray
  cand_keys: np.ndarray
  row_query: np.ndarray
  row_cand: np.ndarray
  cand_count: np.ndarray
  pair_count: np.ndarray
  num_queries: int
  num_cands: int


def _padded(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def dedup_rows(query_keys: np.ndarray, cand_keys: np.ndarray, *,
               pad_multiple: int = 256) -> DedupRows:
  """Distinct queries and candidates of a batch, for `dedup_inbatch_softmax_loss`.

  query_keys, cand_keys: [B] integer keys that determine the towers' outputs (here: ids; a model
  whose tower reads more than an id needs a key over all of its inputs).
  """
  query_keys, cand_keys = np.asarray(query_keys), np.asarray(cand_keys)
  if query_keys.shape != cand_keys.shape or query_keys.ndim != 1 or not query_keys.size:
    raise ValueError(f"query_keys and cand_keys must be non-empty 1-d arrays of one length, got "
                     f"{query_keys.shape} and {cand_keys.shape}")
  if pad_multiple < 1:
    raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
  queries, row_query = np.unique(query_keys, return_inverse=True)
  cands, row_cand, cand_count = np.unique(cand_keys, return_inverse=True, return_counts=True)
  pair = row_query.astype(np.int64) * len(cands) + row_cand
  _, pair_inverse, pair_counts = np.unique(pair, return_inverse=True, return_counts=True)
  g_pad, u_pad = _padded(len(queries), pad_multiple), _padded(len(cands), pad_multiple)
  return DedupRows(
    query_keys=np.concatenate([queries, np.full(g_pad - len(queries), queries[0])]),
    cand_keys=np.concatenate([cands, np.full(u_pad - len(cands), cands[0])]),
    row_query=row_query.astype(np.int32), row_cand=row_cand.astype(np.int32),
    cand_count=np.concatenate([cand_count, np.zeros(u_pad - len(cands), np.int64)]).astype(
      np.int32),
    pair_count=pair_counts[pair_inverse].astype(np.int32),
    num_queries=len(queries), num_cands=len(cands))


def dedup_inbatch_ce(
  q: jax.Array, cands: jax.Array, *, scale: jax.Array, col_bias: jax.Array,
  row_query: jax.Array, row_cand: jax.Array, cand_count: jax.Array,
  pair_count: jax.Array | None = None, mask_same_query: bool = False,
) -> jax.Array:
  """Per-row in-batch cross-entropy [B] from distinct queries and candidates (module docstring).

  Args:
    q: [G, D] distinct query embeddings (rows without any batch row are ignored).
    cands: [U, D] distinct candidate embeddings.
    scale: scalar logit scale (inverse temperature).
    col_bias: [U] float32 subtracted from the candidate's logits, positive included (log Q).
    row_query, row_cand: [B] int indices of each row's query and positive.
    cand_count: [U] rows per candidate, 0 for padding (such columns take no part).
    pair_count: [B] rows sharing this row's (query, positive) pair (required with
      mask_same_query, unused without).
    mask_same_query: also drop the columns of rows with the same query
      (`losses.sampled_softmax_rows`'s rule); False is TFRS's Retrieval.
  """
  count = jnp.asarray(cand_count, jnp.float32)
  dots = jnp.einsum("gd,ud->gu", q, cands, preferred_element_type=jnp.float32)
  logits = jnp.where(count[None, :] > 0, scale * dots - col_bias[None, :], MASKED_LOGIT)
  # A stabiliser only: logsumexp is invariant to it, so it carries no gradient.
  row_max = jax.lax.stop_gradient(logits.max(axis=1))
  weights = jnp.exp(logits - row_max[:, None])                        # [G, U], 0 on padding
  sums = weights @ count                                              # sum_u n_u e^{L_gu - M_g}
  # The positive's logit: its value is gathered from `logits`, so that removing its copies from
  # `sums` below cancels exactly the terms that went in; its gradient flows through the same
  # logit computed from the two vectors ([B, D] gathers), whose backward pass scatters into
  # [G, D] and [U, D] instead of a zeroed [G, U] buffer.
  pos_direct = scale * jnp.einsum("bd,bd->b", q[row_query], cands[row_cand],
                                  preferred_element_type=jnp.float32) - col_bias[row_cand]
  pos_logit = pos_direct + jax.lax.stop_gradient(logits[row_query, row_cand] - pos_direct)
  pos_weight = jnp.exp(pos_logit - row_max[row_query])
  own = count[row_cand]
  if mask_same_query:
    if pair_count is None:
      raise ValueError("pair_count (DedupRows.pair_count) is required with mask_same_query")
    # Every row k of query g removes one copy of its candidate's column from g's sum.
    sums = sums - jax.ops.segment_sum(pos_weight, row_query, num_segments=q.shape[0])
    own = own - jnp.asarray(pair_count, jnp.float32)
  # Kept negatives: what is left of the row's sum once its positive's columns are gone. The floor
  # at 0 only absorbs rounding (mathematically the difference is >= 0).
  negatives = jnp.maximum(sums[row_query] - own * pos_weight, 0.0)
  # log(e^P + negatives) - P with M_g factored out; finite even where e^{P - M_g} underflows.
  return jnp.log(pos_weight + negatives) + row_max[row_query] - pos_logit


def dedup_inbatch_softmax_loss(q: jax.Array, cands: jax.Array, **kwargs) -> jax.Array:
  """Mean over rows of `dedup_inbatch_ce` (same arguments): the batch's in-batch softmax loss."""
  return dedup_inbatch_ce(q, cands, **kwargs).mean()
