"""Streaming item-frequency estimate for the logQ correction (SPEC §1 "Streaming frequency
estimation").

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
RecSys 2019, Algorithm 2 (with m hash arrays, their "multiple hashings" variant). For every hash
array i and slot h:

  A_i[h]  the last training step at which an item hashed to h was in the batch,
  B_i[h]  an exponential moving average of the number of steps between two such batches.

When an item y is in the batch of step t, for every i with h = h_i(y):

  B_i[h] <- (1 - alpha) * B_i[h] + alpha * (t - A_i[h]);   A_i[h] <- t.

Then p_hat(y) = 1 / max_i B_i[h_i(y)] estimates the probability that y is in a batch: the Q of the
in-batch logQ correction (`losses.py` subtracts log Q). Collisions only shorten gaps, so the max
over hash arrays picks the least collided slot (the same argument as the min of a count-min sketch).

The state is a plain pytree (`FreqState`): it lives in the train state and is checkpointed with it.
The official OmniSearchSage code keeps count-min sketches of cumulative counts instead
(pinterest/atg-research omnisearchsage/modules/approx.py); SPEC allows either, we follow Yi et al.

Usage (inside the jitted train step, after the positives of the global batch are known):

  freq = frequency.update(freq, task_id, pos_ids, step, alpha=0.01)
  pos_log_q = frequency.log_q(freq, task_id, pos_ids)        # [B], <= 0
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class FreqState(NamedTuple):
  """Yi et al. arrays for m hash functions over H slots. Slots of all tasks share one table."""

  last_step: jax.Array  # [m, H] float32: A, the step an item hashed here was last seen (0: never)
  avg_gap: jax.Array  # [m, H] float32: B, moving average of steps between sightings (0: never seen)


def init_freq(size: int, num_hashes: int) -> FreqState:
  """Empty estimator: A = B = 0 (Yi et al. leave the start unspecified; zeros are the usual choice).

  With A = 0 the first sighting at step t records a gap of t, and B climbs from 0 towards the true
  mean gap over roughly 1/alpha sightings, so early estimates err towards p_hat = 1 (log Q = 0, i.e.
  too little correction rather than too much).
  """
  zeros = jnp.zeros((num_hashes, size), jnp.float32)
  return FreqState(last_step=zeros, avg_gap=zeros)


# --- hashing ------------------------------------------------------------------------------------
# All arithmetic is uint32, where XLA multiplication and addition wrap modulo 2^32 (the hash relies
# on that) and right shifts are logical. Constants are np.uint32 so nothing is promoted to a signed
# or 64-bit type. The scheme is fixed forever: a checkpointed FreqState is only meaningful with it.
#
#   fmix32(h)         MurmurHash3's 32-bit finaliser: xor-shift / multiply rounds; a bijection of
#                     uint32 with full avalanche (each input bit flips each output bit w.p. ~1/2).
#   salt(task, i)     = fmix32(fmix32(task + 0x6A09E667) + i * 0x9E3779B9): one 32-bit salt per
#                     (task, hash array), so every task gets its own m hash functions and an
#                     entity id reused by two tasks (pins and products are both numbered from 0)
#                     lands in unrelated slots instead of sharing its counts.
#   h_i(task, y)      = fmix32(y ^ salt(task, i)) mod H.
#
# Because fmix32 is a bijection, two ids collide in array i only through the final `mod H`; because
# the salts differ, a collision in one array says nothing about the others.
_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)
_TASK_SEED = np.uint32(0x6A09E667)  # first 32 bits of frac(sqrt(2)), a nothing-up-my-sleeve number
_GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: spreads consecutive hash indices


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> np.uint32(16))
  h = h * _M1
  h = h ^ (h >> np.uint32(13))
  h = h * _M2
  return h ^ (h >> np.uint32(16))


def _as_uint32(x: jax.Array) -> jax.Array:
  """Reinterprets integer ids as uint32 bits (negative ids stay distinct; 64-bit ids fold in hi)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint32:
    return x
  if jnp.dtype(x.dtype).itemsize == 8:  # only with jax_enable_x64: fold the high word in
    words = jax.lax.bitcast_convert_type(x.astype(jnp.uint64), jnp.uint32)  # [..., 2]
    lo, hi = words[..., 0], words[..., 1]
    return lo ^ _fmix32(hi + _GOLDEN)
  return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)


def hash_keys(task_id, entity_ids: jax.Array, size: int, num_hashes: int) -> jax.Array:
  """Slots of `entity_ids` (any shape) in each of the m hash arrays: int32 [m, *entity_ids.shape].

  task_id: int or int scalar array; tasks get independent hash functions (see the scheme above).
  """
  if not 0 < size <= 2**31:
    raise ValueError(f"size must be in [1, 2^31], got {size}")
  x = _as_uint32(entity_ids)
  task = _as_uint32(jnp.asarray(task_id))
  i = jnp.arange(num_hashes, dtype=jnp.uint32)
  salts = _fmix32(_fmix32(task + _TASK_SEED) + i * _GOLDEN)  # [m]
  salts = salts.reshape((num_hashes,) + (1,) * x.ndim)
  slots = _fmix32(x[None] ^ salts) % np.uint32(size)
  return slots.astype(jnp.int32)


# --- update and query ---------------------------------------------------------------------------
def update(
  state: FreqState,
  task_id,
  entity_ids: jax.Array,
  step,
  alpha: float,
  valid: jax.Array | None = None,
) -> FreqState:
  """One Yi et al. update for a whole batch of items seen at `step`.

  Batch semantics: every entry computes its new B from the OLD A and B of its slot, so a slot hit
  several times in one batch (the same item twice, or two items that collide) moves exactly as if it
  had been hit once. That is what p_hat estimates: the probability of being IN a batch, not the
  number of times per batch. (Processing the batch one item at a time, as a literal reading of
  Algorithm 2 would, records gaps of 0 for duplicates and makes popular items look far more
  popular.)
  All entries of a slot therefore write bit-identical values, so the scatter's order is irrelevant:
  the result does not depend on how the batch is split over devices.

  Args:
    state: the current estimate.
    task_id: int (or int scalar array) selecting the task's hash functions.
    entity_ids: integer ids of the items in the (global) batch, any shape.
    step: the global training step t (int or scalar array). Stored as float32, exact up to 2^24.
    alpha: learning rate of the gap average (SPEC: 0.01).
    valid: optional bool, same shape as entity_ids; False entries (padding, rows without a
      positive) leave the state untouched.
  """
  m, size = state.avg_gap.shape
  ids = jnp.ravel(entity_ids)
  slots = hash_keys(task_id, ids, size, m)  # [m, n]
  t = jnp.asarray(step, jnp.float32)
  old_a = jnp.take_along_axis(state.last_step, slots, axis=1)
  old_b = jnp.take_along_axis(state.avg_gap, slots, axis=1)
  new_b = (1.0 - alpha) * old_b + alpha * (t - old_a)
  if valid is not None:
    # An out-of-range slot is dropped by the scatter (mode="drop"): invalid entries write nothing,
    # instead of writing the old value back and racing with a valid entry of the same slot.
    slots = jnp.where(jnp.ravel(valid)[None, :], slots, size)
  rows = jnp.broadcast_to(jnp.arange(m)[:, None], slots.shape)
  avg_gap = state.avg_gap.at[rows, slots].set(new_b, mode="drop")
  last_step = state.last_step.at[rows, slots].set(jnp.broadcast_to(t, slots.shape), mode="drop")
  return FreqState(last_step=last_step, avg_gap=avg_gap)


def log_q(state: FreqState, task_id, entity_ids: jax.Array) -> jax.Array:
  """log p_hat(y) = -log max_i B_i[h_i(y)], clipped to <= 0: float32, shape of entity_ids.

  p_hat is a probability of being in a batch, so it is clipped at 1, i.e. B is floored at 1 step.
  The floor also covers the two degenerate cases:
    - unseen items (B = 0 in every array): log Q = 0, no correction. We know nothing about them, and
      treating them as popular never inflates a logit (the correction is subtracted, so a too-small
      log Q would boost the item as a negative);
    - items seen only early (B still ramping up from 0, see `init_freq`): B < 1 would mean "more
      than once per batch", which cannot happen.
  Call it after `update` with the same batch, so every positive has been seen at least once.
  """
  m, size = state.avg_gap.shape
  slots = hash_keys(task_id, entity_ids, size, m)  # [m, *shape]
  flat = slots.reshape(m, -1)
  gap = jnp.take_along_axis(state.avg_gap, flat, axis=1).max(axis=0)
  return (-jnp.log(jnp.maximum(gap, 1.0))).reshape(jnp.shape(entity_ids))
