"""Sampled softmax with logQ correction, per task (SPEC §1 "Loss: multi-task sampled softmax").

For one task with pairs (x_i, y_i), i < B, over the GLOBAL batch (under jit the arrays are sharded
over the `data` mesh axis and XLA gathers the candidates: every row sees all B positives):

  s(q, p)   = cos(q, p) * exp(min(t, t_max))                learned temperature t, clipped (SPEC)
  in-batch  row i: softmax over the positives of all rows; column j has logit
            s(q_i, p_j) - log Q(y_j); plus, when given, row i's own hard negatives h_ik
            (judged or mined, ANCE: Xiong et al. 2021) with logit s(q_i, h_ik), no logQ
  random    row i: softmax over [y_i, n_1 .. n_N] (N negatives shared by all rows),
            logits [s(q_i, p_i) - log Q(y_i), s(q_i, n_k) - log Q_n(n_k)]
  loss      = mean over valid rows of (CE_in-batch + CE_random); the trainer sums tasks.

logQ sign convention (the one place it is decided): every candidate logit is
`s - log Q`, the log of the probability that the candidate was SAMPLED (is in the batch / among the
random negatives) is SUBTRACTED after temperature scaling. log Q <= 0, so a rare item gets a large
boost as a negative and a popular one a small boost: popular items, which show up as negatives all
the time, are penalised less per appearance. Correct sampled softmax (Bengio & Senecal 2008;
Yi et al. 2019, eq. 3); peer libraries have shipped the opposite sign, tests/test_losses.py pins it.

Choices taken from the official PyTorch code, pinterest/atg-research
omnisearchsage/omnisearchsage/modules/metric_learning_softmax.py (`SoftmaxCorrectionLoss`):
  - Layout: each softmax is [positive, negatives...] with the target in column 0
    (`compute_similarity_loss`). We compute CE_i = softplus(lse_negatives_i - positive_logit_i), the
    same thing without materialising the concatenation.
  - The positive logit gets a correction too, and the SAME one in both softmaxes
    (`get_default_logits_processor` applies `PositiveSPCLogitsProcessor` in both
    `scale_correct_and_mask` calls). The official positive correction is log P(y|x) from a
    (query, item) count-min sketch; SPEC's in-batch formula subtracts log Q(y_i) from the diagonal,
    so our positive logit is s(q_i, p_i) - log Q(y_i) in the in-batch AND the random softmax.
  - Accidental hits (`_mask_logits`): a negative column whose entity id equals the row's positive id
    is removed, in both softmaxes; in the in-batch softmax, columns of rows with the same query id
    are removed too (so for a query with pairs (q, a), (q, b), b is not a negative in the row of a).
    The row's own column is removed by the first rule (its positive is column 0). Random negatives
    are only masked against the row's own positive (official `share_masks_for_same_query=False`).
  - Masked logits get a huge negative finite value, not -inf (official: finfo.min), so a row whose
    negatives are all masked gives CE = 0 with finite gradients.
  - Temperature: official clamps the parameter in place (`clamp_temp`); in a pure function we clip
    in the forward pass instead, so the gradient w.r.t. log_temperature is 0 above
    `temperature_max`.
  - Nested dims (`MultiDimSoftmaxCorrectionLossV2`): the loss is re-run on L2-renormalised prefixes
    with per-dimension weights; dims larger than the embedding are skipped.
Beyond the official code: `valid` rows (e.g. a compatibility pair whose positive has no legacy
vector) add no loss and their columns are no negatives for anyone.

The B x B and B x N logits go through one primitive, `masked_logsumexp_<impl>(q, cands, scale,
col_bias, mask_fn, block_size)`, chosen by `impl` (config `loss.impl`):
  - "dense": the whole [B, C] logit matrix at once, kept for a hand-written backward pass (one
    [B, C] residual; the softmax weights are formed once and feed two matmuls).
  - "blockwise": an online (streaming) logsumexp over column blocks of `block_size` with a custom
    VJP whose backward pass recomputes each block's logits, so memory is O(B x block_size) on top of
    the O(B) row outputs; for a 64k-pair global batch with 4 random negatives per pair the dense
    [B, B + 4B] logits alone would be 86 GB. Same loss and gradients as "dense" (tests/
    test_blockwise.py), more FLOPs (the logits are computed twice).
Masks are functions of (row indices, column indices) rather than [B, C] arrays so that the
blockwise impl evaluates them one block at a time.

Usage:
  loss, metrics = sampled_softmax_loss(q, p, log_temperature=t, temperature_max=math.log(100.),
                                       query_ids=qid, pos_ids=pid, pos_log_q=log_q)
"""

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnisage.models.compat import l2_normalize  # gradient-safe at zero vectors

# Value of masked logits: exp() underflows to exactly 0, yet it stays finite after subtracting any
# realistic logit (|s| <= exp(t_max) = 100, |log Q| < 100), so no inf - inf and no NaN gradients.
MASKED_LOGIT = -1e30

MaskFn = Callable[[jax.Array, jax.Array], jax.Array]


def logit_scale(log_temperature: jax.Array, temperature_max: float) -> jax.Array:
  """exp(min(t, t_max)): the inverse temperature multiplying cosines (gradient 0 above t_max)."""
  return jnp.exp(jnp.minimum(log_temperature, temperature_max))


def _dense_logits(mask_fn, q, cands, scale, col_bias, mask_args):
  """The masked [B, C] logits `scale * q @ cands.T - col_bias` (MASKED_LOGIT where masked).

  Scale, bias and mask are one elementwise pass over the matmul's output (XLA fuses them).
  """
  dots = jnp.einsum("bd,cd->bc", q, cands, preferred_element_type=jnp.float32)
  drop = mask_fn(jnp.arange(q.shape[0]), jnp.arange(cands.shape[0]), *mask_args)
  return jnp.where(drop, MASKED_LOGIT, scale * dots - col_bias[None, :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_lse(mask_fn, q, cands, scale, col_bias, mask_args):
  return _dense_lse_fwd(mask_fn, q, cands, scale, col_bias, mask_args)[0]


def _dense_lse_fwd(mask_fn, q, cands, scale, col_bias, mask_args):
  logits = _dense_logits(mask_fn, q, cands, scale, col_bias, mask_args)
  row_max = logits.max(axis=1)
  lse = row_max + jnp.log(jnp.exp(logits - row_max[:, None]).sum(axis=1))
  return (lse, row_max), (q, cands, scale, mask_args, logits, lse)


def _dense_lse_bwd(mask_fn, residuals, cotangents):
  q, cands, scale, mask_args, logits, lse = residuals
  g_lse, _ = cotangents   # row_max carries no gradient (it is for metrics)
  # d lse_i / d logit_ij = softmax weight; masked columns pass no gradient (also for a fully
  # masked row, whose weights sit on them), as `where` in plain autodiff would.
  weights = jnp.where(logits > MASKED_LOGIT, g_lse[:, None] * jnp.exp(logits - lse[:, None]), 0.0)
  weighted_cands = weights @ cands                                     # [B, D]
  # One pass over the weights for the candidates' gradient and the column sums (bias gradient):
  # a ones column appended to q.
  q_ones = jnp.concatenate([q, jnp.ones((q.shape[0], 1), q.dtype)], axis=1)
  weighted_rows = jnp.einsum("bc,bd->cd", weights, q_ones, preferred_element_type=jnp.float32)
  dq = scale * weighted_cands
  dcands = scale * weighted_rows[:, :-1]
  dbias = -weighted_rows[:, -1]
  dscale = jnp.sum(q * weighted_cands)   # sum_ij w_ij q_i . c_j
  dmask = jax.tree.map(_zero_cotangent, mask_args)
  return (dq.astype(q.dtype), dcands.astype(cands.dtype), dscale.astype(jnp.result_type(scale)),
          dbias.astype(jnp.float32), dmask)


_dense_lse.defvjp(_dense_lse_fwd, _dense_lse_bwd)


def masked_logsumexp_dense(
  q: jax.Array, cands: jax.Array, *, scale: jax.Array, col_bias: jax.Array, mask_fn: MaskFn,
  block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Row-wise logsumexp and max of `scale * q @ cands.T - col_bias` over the unmasked columns.

  The whole [B, C] logit matrix at once, with a hand-written VJP: the backward pass reads the
  logits kept from the forward pass once to form the softmax weights, then two matmuls give every
  gradient (q; candidates together with the bias). Plain autodiff kept the logits AND their exp
  (twice the [B, C] residual memory) and made four more elementwise passes over [B, C]
  (benchmarks/vs_tfrs.py times the step). Same values and gradients (tests/test_losses.py against
  a NumPy reference with finite differences).

  Args:
    q: [B, D] row embeddings.
    cands: [C, D] candidate embeddings.
    scale: scalar logit scale.
    col_bias: [C] float32 SUBTRACTED from every logit of its column (log Q of the candidate).
    mask_fn: (rows [b] int32, cols [c] int32) -> bool [b, c], True where the column is NOT a
      candidate for the row. Index-based so a blockwise variant can evaluate it per block.
    block_size: unused (the signature shared by all impls).
  Returns:
    (lse [B], row_max [B]) float32. A fully masked row gives about MASKED_LOGIT for both.
    row_max carries no gradient (it is for metrics).
  """
  q, cands = jnp.asarray(q), jnp.asarray(cands)
  mask, mask_args = jax.closure_convert(mask_fn, jnp.arange(q.shape[0]),
                                        jnp.arange(cands.shape[0]))
  return _dense_lse(mask, q, cands, jnp.asarray(scale, jnp.float32),
                    jnp.asarray(col_bias, jnp.float32), tuple(mask_args))


def _block_logits(mask_fn, mask_args, q, cands, scale, col_bias, start, done, block):
  """Logits of the columns [start, start + block) and their cosines: [B, block] float32 each.

  Masked columns get MASKED_LOGIT like the dense impl; columns below `done` were covered by an
  earlier block (the last block is shifted left to stay full, see below) and get -inf, which
  removes them from both the sum and the max.
  """
  cols = start + jnp.arange(block)
  dots = jnp.einsum("bd,cd->bc", q, jax.lax.dynamic_slice_in_dim(cands, start, block),
                    preferred_element_type=jnp.float32)
  logits = scale * dots - jax.lax.dynamic_slice_in_dim(col_bias, start, block)[None, :]
  logits = jnp.where(mask_fn(jnp.arange(q.shape[0]), cols, *mask_args), MASKED_LOGIT, logits)
  return jnp.where((cols < done)[None, :], -jnp.inf, logits), dots


def _block_starts(num_cols: int, block: int, i):
  """Block i covers new columns from i * block; the last one is shifted to end at num_cols.

  Shifting instead of padding keeps every block the same static shape without copying the
  candidates into a padded array.
  """
  done = i * block
  return jnp.minimum(done, num_cols - block), done


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise_lse(mask_fn, block, q, cands, scale, col_bias, mask_args):
  return _blockwise_lse_fwd(mask_fn, block, q, cands, scale, col_bias, mask_args)[0]


def _blockwise_lse_fwd(mask_fn, block, q, cands, scale, col_bias, mask_args):
  num_cols = cands.shape[0]

  def body(i, carry):
    row_max, total = carry   # running max and sum of exp(logit - running max), per row
    start, done = _block_starts(num_cols, block, i)
    logits, _ = _block_logits(mask_fn, mask_args, q, cands, scale, col_bias, start, done, block)
    new_max = jnp.maximum(row_max, logits.max(axis=1))  # finite: a block has >= 1 new column
    total = total * jnp.exp(row_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(axis=1)
    return new_max, total

  b = q.shape[0]
  init = (jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.float32))
  row_max, total = jax.lax.fori_loop(0, -(-num_cols // block), body, init)
  lse = row_max + jnp.log(total)
  return (lse, row_max), (q, cands, scale, col_bias, mask_args, lse)


def _blockwise_lse_bwd(mask_fn, block, residuals, cotangents):
  q, cands, scale, col_bias, mask_args, lse = residuals
  g_lse, _ = cotangents   # row_max carries no gradient, as in the dense impl
  num_cols = cands.shape[0]

  def body(i, carry):
    dq, dcands, dbias, dscale = carry
    start, done = _block_starts(num_cols, block, i)
    logits, dots = _block_logits(mask_fn, mask_args, q, cands, scale, col_bias, start, done,
                                 block)
    # d lse / d logit = softmax weight; masked and already-covered columns pass no gradient
    # (dense: `where` drops it), which matters for fully masked rows whose weights sit on them.
    keep = logits > MASKED_LOGIT
    dlogits = jnp.where(keep, g_lse[:, None] * jnp.exp(logits - lse[:, None]), 0.0)
    cblock = jax.lax.dynamic_slice_in_dim(cands, start, block)
    dq = dq + scale * jnp.einsum("bc,cd->bd", dlogits, cblock, preferred_element_type=jnp.float32)
    dcblock = scale * jnp.einsum("bc,bd->cd", dlogits, q, preferred_element_type=jnp.float32)
    dcands = jax.lax.dynamic_update_slice_in_dim(
      dcands, jax.lax.dynamic_slice_in_dim(dcands, start, block) + dcblock, start, 0)
    dbias = jax.lax.dynamic_update_slice_in_dim(
      dbias, jax.lax.dynamic_slice_in_dim(dbias, start, block) - dlogits.sum(axis=0), start, 0)
    return dq, dcands, dbias, dscale + (dlogits * dots).sum()

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(cands.shape, jnp.float32),
          jnp.zeros(col_bias.shape, jnp.float32), jnp.zeros((), jnp.float32))
  dq, dcands, dbias, dscale = jax.lax.fori_loop(0, -(-num_cols // block), body, init)
  # The mask's arrays (ids, validity) only select columns: no gradient flows into them.
  dmask = jax.tree.map(_zero_cotangent, mask_args)
  return (dq.astype(q.dtype), dcands.astype(cands.dtype), dscale.astype(jnp.result_type(scale)),
          dbias.astype(col_bias.dtype), dmask)


def _zero_cotangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


_blockwise_lse.defvjp(_blockwise_lse_fwd, _blockwise_lse_bwd)


def masked_logsumexp_blockwise(
  q: jax.Array, cands: jax.Array, *, scale: jax.Array, col_bias: jax.Array, mask_fn: MaskFn,
  block_size: int = 4096,
) -> tuple[jax.Array, jax.Array]:
  """`masked_logsumexp_dense` (same arguments and results) over column blocks of block_size.

  A fori_loop keeps a running row max and rescaled sum of exponentials (online logsumexp); the
  custom VJP stores only the inputs and the [B] logsumexp and recomputes each block's logits in the
  backward loop, accumulating the gradients of q, cands, col_bias and scale. Peak memory beyond
  the inputs is a few [B, block_size] float32 blocks. Under jit with rows sharded over the `data`
  mesh axis the blocks stay row-sharded (the per-block candidates are gathered, the [B, C] logits
  never exist anywhere).

  mask_fn may close over traced arrays (ids, validity under jit). A custom VJP must not close
  over values that carry a tangent, so `jax.closure_convert` hoists those (floats) into explicit
  arguments, which get zero cotangents (a mask has no gradient); integer and bool arrays, which
  never carry one, may stay in the closure (what closure_convert does).
  """
  q, cands = jnp.asarray(q), jnp.asarray(cands)
  scale = jnp.asarray(scale, jnp.float32)
  col_bias = jnp.asarray(col_bias, jnp.float32)
  if block_size < 1 or cands.shape[0] < 1:
    raise ValueError(f"blockwise logsumexp needs >= 1 candidate and loss.block_size >= 1, got "
                     f"{cands.shape[0]} candidates and block_size={block_size}")
  block = min(int(block_size), cands.shape[0])
  rows = jnp.arange(q.shape[0])
  mask, mask_args = jax.closure_convert(mask_fn, rows, jnp.arange(block))
  return _blockwise_lse(mask, block, q, cands, scale, col_bias, tuple(mask_args))


LSE_IMPLS = {"dense": masked_logsumexp_dense, "blockwise": masked_logsumexp_blockwise}


def _hard_lse(q, hard, scale, pos_ids, hard_ids, hard_valid):
  """([B] logsumexp, [B] max) of each row's hard-negative logits scale * q_i . h_ik.

  No logQ: a hard negative was chosen for its row, not sampled from the batch's distribution, so
  there is no sampling bias to correct. Masked (MASKED_LOGIT): padding slots (`hard_valid` False)
  and accidental hits (a hard negative that is the row's positive)."""
  if hard_ids is None:
    raise ValueError("hard_ids are required with hard (accidental-hit masking)")
  hard_ids = jnp.asarray(hard_ids)
  keep = hard_ids != jnp.asarray(pos_ids)[:, None]
  if hard_valid is not None:
    keep = keep & jnp.asarray(hard_valid, bool)
  dots = jnp.einsum("bd,bkd->bk", q, hard, preferred_element_type=jnp.float32)
  logits = jnp.where(keep, scale * dots, MASKED_LOGIT)
  return jax.nn.logsumexp(logits, axis=1), logits.max(axis=1)


def sampled_softmax_rows(
  q: jax.Array,
  p: jax.Array,
  *,
  log_temperature: jax.Array,
  temperature_max: float,
  query_ids: jax.Array,
  pos_ids: jax.Array,
  pos_log_q: jax.Array,
  neg: jax.Array | None = None,
  neg_ids: jax.Array | None = None,
  neg_log_q: jax.Array | None = None,
  valid: jax.Array | None = None,
  hard: jax.Array | None = None,
  hard_ids: jax.Array | None = None,
  hard_valid: jax.Array | None = None,
  use_logq: bool = True,
  impl: str = "dense",
  block_size: int = 4096,
) -> dict[str, jax.Array]:
  """Per-row terms of `sampled_softmax_loss` (same arguments): a dict of [B] arrays.

  ce_inbatch, ce_random (0 without negatives) float32, 0 on invalid rows; correct (float 0/1: the
  positive beats every unmasked in-batch column); weight (float 0/1: valid).
  """
  if impl not in LSE_IMPLS:
    raise ValueError(f"loss.impl must be one of {sorted(LSE_IMPLS)}, got {impl!r}")
  lse_fn = functools.partial(LSE_IMPLS[impl], block_size=block_size)
  b = q.shape[0]
  # jnp, not NumPy: masks and blockwise impls index these with traced row/column indices.
  q, p, query_ids, pos_ids = map(jnp.asarray, (q, p, query_ids, pos_ids))
  neg, neg_ids = (None if x is None else jnp.asarray(x) for x in (neg, neg_ids))
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  # Invalid rows may carry garbage (a zero or NaN placeholder for a missing legacy vector). Replace
  # it before it meets a matmul: `where` passes no cotangent (and no NaN) back to what it discards.
  p = jnp.where(valid[:, None], p, jnp.zeros_like(p))
  scale = logit_scale(log_temperature, temperature_max)
  if use_logq:
    pos_bias = jnp.where(valid, pos_log_q, 0.0).astype(jnp.float32)
  else:
    pos_bias = jnp.zeros((b,), jnp.float32)

  # The positive logit, shared by both softmaxes (official PositiveSPCLogitsProcessor, see above).
  pos_logit = scale * jnp.einsum("bd,bd->b", q, p, preferred_element_type=jnp.float32) - pos_bias

  def inbatch_mask(rows, cols):
    same_pos = pos_ids[rows][:, None] == pos_ids[cols][None, :]  # includes the row's own column
    same_query = query_ids[rows][:, None] == query_ids[cols][None, :]
    return same_pos | same_query | ~valid[cols][None, :]

  lse_in, max_in = lse_fn(q, p, scale=scale, col_bias=pos_bias, mask_fn=inbatch_mask)
  if hard is not None:   # the row's own hard negatives join its in-batch softmax, with no logQ
    lse_hard, max_hard = _hard_lse(q, jnp.asarray(hard), scale, pos_ids, hard_ids, hard_valid)
    lse_in, max_in = jnp.logaddexp(lse_in, lse_hard), jnp.maximum(max_in, max_hard)
  ce_in = jax.nn.softplus(lse_in - pos_logit)  # = logaddexp(pos, lse_negatives) - pos
  correct = (pos_logit >= max_in).astype(jnp.float32)

  if neg is not None:
    if neg_ids is None:
      raise ValueError("neg_ids are required with neg (accidental-hit masking)")
    if use_logq and neg_log_q is None:
      raise ValueError("neg_log_q is required with neg when use_logq (pass zeros to opt out)")
    n = neg.shape[0]
    neg_bias = jnp.asarray(neg_log_q, jnp.float32) if use_logq else jnp.zeros((n,), jnp.float32)

    def random_mask(rows, cols):
      return pos_ids[rows][:, None] == neg_ids[cols][None, :]

    lse_rnd, _ = lse_fn(q, neg, scale=scale, col_bias=neg_bias, mask_fn=random_mask)
    ce_rnd = jax.nn.softplus(lse_rnd - pos_logit)
  else:
    ce_rnd = jnp.zeros((b,), jnp.float32)

  zero = jnp.zeros((b,), jnp.float32)
  return {
    "ce_inbatch": jnp.where(valid, ce_in, zero),
    "ce_random": jnp.where(valid, ce_rnd, zero),
    "correct": jnp.where(valid, correct, zero),
    "weight": valid.astype(jnp.float32),
  }


def sampled_softmax_loss(
  q: jax.Array,
  p: jax.Array,
  *,
  log_temperature: jax.Array,
  temperature_max: float,
  query_ids: jax.Array,
  pos_ids: jax.Array,
  pos_log_q: jax.Array,
  neg: jax.Array | None = None,
  neg_ids: jax.Array | None = None,
  neg_log_q: jax.Array | None = None,
  valid: jax.Array | None = None,
  hard: jax.Array | None = None,
  hard_ids: jax.Array | None = None,
  hard_valid: jax.Array | None = None,
  use_logq: bool = True,
  impl: str = "dense",
  block_size: int = 4096,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One task's loss: mean over valid rows of in-batch CE + random-negatives CE.

  Args:
    q: [B, D] L2-normalised query embeddings of the global batch.
    p: [B, D] L2-normalised positives; row i's positive is p[i].
    log_temperature: scalar learned t; logits are cos * exp(min(t, temperature_max)).
    temperature_max: clip of t (SPEC: ln 100).
    query_ids: [B] int ids of the queries (same id: not each other's negatives).
    pos_ids: [B] int entity ids of the positives (same id: accidental hit, masked).
    pos_log_q: [B] float log Q(y_i) <= 0, probability that y_i is in a batch (`frequency.log_q`).
    neg: optional [N, D] L2-normalised random negatives, shared by all rows.
    neg_ids: [N] int entity ids of the negatives (required with neg).
    neg_log_q: [N] float log Q_n of the negatives under their sampling distribution (required with
      neg when use_logq), e.g. log(N / catalogue size) for uniform sampling.
    valid: optional [B] bool; False rows add no loss and are no negatives.
    hard: optional [B, K, D] L2-normalised hard negatives of each row (judged or mined, ANCE),
      added to that row's in-batch softmax with no logQ correction.
    hard_ids: [B, K] int entity ids of the hard negatives (required with hard; a hard negative
      equal to the row's positive is masked).
    hard_valid: optional [B, K] bool; False slots (padding) are masked.
    use_logq: False drops every correction (ablation).
    impl: name in LSE_IMPLS of the logsumexp primitive: "dense" or "blockwise" (same results,
      O(B x block_size) instead of O(B x (B + N)) memory).
    block_size: candidate columns per block of the blockwise impl.
  Returns:
    (loss, metrics): scalar float32, and scalars loss_inbatch, loss_random, accuracy_inbatch (the
    positive has the top in-batch logit, ties count as hits), logit_scale, num_valid.
  """
  rows = sampled_softmax_rows(
    q, p, log_temperature=log_temperature, temperature_max=temperature_max, query_ids=query_ids,
    pos_ids=pos_ids, pos_log_q=pos_log_q, neg=neg, neg_ids=neg_ids, neg_log_q=neg_log_q,
    valid=valid, hard=hard, hard_ids=hard_ids, hard_valid=hard_valid, use_logq=use_logq,
    impl=impl, block_size=block_size,
  )
  num_valid = rows["weight"].sum()
  denom = jnp.maximum(num_valid, 1.0)  # an all-invalid batch gives 0, not NaN
  loss_in = rows["ce_inbatch"].sum() / denom
  loss_rnd = rows["ce_random"].sum() / denom
  metrics = {
    "loss_inbatch": loss_in,
    "loss_random": loss_rnd,
    "accuracy_inbatch": rows["correct"].sum() / denom,
    "logit_scale": logit_scale(log_temperature, temperature_max),
    "num_valid": num_valid,
  }
  return loss_in + loss_rnd, metrics


def nested_dim_weights(
  dim: int, nested_dims: Sequence[int] = (), nested_weight: float | Sequence[float] = 0.05
) -> dict[int, float]:
  """{dim: 1.0} plus the nested prefixes: the two-tuple form of `dim_weights`.

  nested_weight: one weight for all nested dims, or one per dim. SPEC / official code: 16, 32, 64,
  128 at 0.05 and 256, 512 at 1.0, e.g. nested_dim_weights(512, (16, 32, 64, 128, 256),
  (0.05, 0.05, 0.05, 0.05, 1.0)).
  """
  if isinstance(nested_weight, (int, float)):
    nested_weight = (float(nested_weight),) * len(nested_dims)
  if len(nested_weight) != len(nested_dims):
    raise ValueError(f"{len(nested_dims)} nested dims but {len(nested_weight)} weights")
  weights = {int(dim): 1.0}
  weights.update({int(d): float(w) for d, w in zip(nested_dims, nested_weight)})
  return weights


def nested_sampled_softmax_loss(
  q: jax.Array,
  p: jax.Array,
  *,
  nested_dims: Sequence[int] = (),
  nested_weight: float | Sequence[float] = 0.05,
  dim_weights: Mapping[int, float] | None = None,
  neg: jax.Array | None = None,
  hard: jax.Array | None = None,
  **loss_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Matryoshka loss: sum over d of weight_d * sampled_softmax_loss on renormalised prefixes [:d].

  dim_weights: {d: weight}; if None it is nested_dim_weights(D, nested_dims, nested_weight), i.e.
    the full dimension D at weight 1 plus the nested prefixes. Dims above D are skipped, as in the
    official MultiDimSoftmaxCorrectionLossV2 (a 512-d weight does not apply to a 256-d legacy
    tower).
    The full dimension is used as is (its vectors are already unit norm).
  loss_kwargs: everything else of `sampled_softmax_loss` (ids, log Q, temperature, valid, ...).
  Returns:
    (loss, metrics): metrics of the largest dim used under the plain names, plus loss_d{d} (the
    unweighted loss of each dim).
  """
  full = q.shape[-1]
  if dim_weights is None:
    dim_weights = nested_dim_weights(full, nested_dims, nested_weight)
  dims = sorted(d for d in dim_weights if d <= full)
  if not dims:
    raise ValueError(f"no dim of {sorted(dim_weights)} fits embeddings of dim {full}")
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for d in dims:
    if d == full:
      qd, pd, nd, hd = q, p, neg, hard
    else:
      qd, pd = l2_normalize(q[:, :d]), l2_normalize(p[:, :d])
      nd = None if neg is None else l2_normalize(neg[:, :d])
      hd = None if hard is None else l2_normalize(hard[..., :d])
    loss_d, metrics_d = sampled_softmax_loss(qd, pd, neg=nd, hard=hd, **loss_kwargs)
    total = total + dim_weights[d] * loss_d
    metrics[f"loss_d{d}"] = loss_d
    if d == dims[-1]:
      metrics.update(metrics_d)
  return total, metrics
