"""Orbax checkpoints: the whole train state plus the Grain iterator state, verified on restore.

One checkpoint (a step directory under <workdir>/checkpoints) holds three items:
  state      the TrainState pytree (params, optimiser state, frequency estimator, rng, step)
  data       the Grain iterator state (JSON), so a resumed run reads exactly the batches an
             uninterrupted run would have read (MaxText does the same)
  integrity  a fingerprint of every array of `state` (JSON), computed on the devices at save time

Orbax writes each step to a temporary directory and renames it when complete, so a save cut short
by a crash is never mistaken for a checkpoint. A finished checkpoint that is later damaged is
caught on restore: a file that no longer reads (truncated, deleted), an array whose fingerprint
differs from the one saved with it (flipped bytes that still decompress), or a non-finite value
anywhere in the state. `restore_latest` then warns, moves the damaged step directory aside to
<workdir>/checkpoints_corrupt/ (so the step can be written again) and falls back to the previous
checkpoint. `usable_or_fresh` is the loop's policy when none is usable: refuse (exit 2, naming
`train.restart_if_corrupt`) or, when allowed, start afresh.

The fingerprint of an array is two uint32 sums over its bits: the plain sum and the sum weighted
by position (Fletcher's idea). Any single flipped bit changes the plain sum; swapped or multiple
changes that cancel in one sum rarely cancel in both. It is computed inside jit over the sharded
arrays (one small reduction per leaf, no host copy of the state), so it costs the same on one host
or many.

Usage:
  ckpt = Checkpointer(workdir, keep=3)
  restored = ckpt.restore_latest(abstract_state)   # None on a fresh workdir
  ckpt.save(step, state, iterator.get_state())
"""

import json
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "integrity")
CORRUPT_DIR = "checkpoints_corrupt"


class CorruptCheckpointError(ValueError):
  """Checkpoints exist but none restores intact (a ValueError: launch.py exits 2 with it)."""


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2]: (sum of the bits, position-weighted sum of the bits), both modulo 2^32."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:   # 8-byte types: each element is two uint32 words
    bits = jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  weights = jnp.arange(1, bits.shape[0] + 1, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_leaf_fingerprint, tree)


@jax.jit
def _nonfinite_counts(tree):
  return jax.tree.map(
      lambda x: jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating)
      else jnp.zeros((), jnp.int32), tree)


def _host(x) -> np.ndarray:
  """A replicated result on this host (fully addressable or not)."""
  return np.asarray(x.addressable_data(0)) if hasattr(x, "addressable_data") else np.asarray(x)


def fingerprint(state) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of every array of a state pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(_fingerprints(state))[0]
  return {jax.tree_util.keystr(path): [int(v) for v in _host(fp)] for path, fp in leaves}


def nonfinite_leaves(state) -> dict[str, int]:
  """{leaf path: count} of the floating-point arrays holding NaN or infinity."""
  leaves = jax.tree_util.tree_flatten_with_path(_nonfinite_counts(state))[0]
  counts = {jax.tree_util.keystr(path): int(_host(n)) for path, n in leaves}
  return {path: n for path, n in counts.items() if n}


def verify(state, saved: dict | None) -> None:
  """ValueError naming the first leaf whose fingerprint differs or that holds non-finite values."""
  if saved is not None:
    found = fingerprint(state)
    if set(found) != set(saved):
      raise ValueError(f"the state's arrays ({len(found)}) are not those saved ({len(saved)})")
    for path, value in found.items():
      if value != list(saved[path]):
        raise ValueError(f"array {path} differs from its fingerprint at save time")
  bad = nonfinite_leaves(state)
  if bad:
    path, count = next(iter(bad.items()))
    raise ValueError(f"array {path} holds {count} non-finite values"
                     + (f" ({len(bad)} arrays in all)" if len(bad) > 1 else ""))


def _quiet_closed_loop_callbacks():
  """A failed Orbax restore leaves TensorStore reads in flight whose completion callbacks reach
  the restore's asyncio loop after it closed; Python then prints "Exception ignored ...
  RuntimeError: Event loop is closed" tracebacks that say nothing about the checkpoint (already
  reported as corrupt). This filters exactly that message out of sys.unraisablehook and passes
  every other unraisable exception on."""
  previous = sys.unraisablehook
  if getattr(previous, "_omnisage_filter", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and \
        str(unraisable.exc_value) == "Event loop is closed":
      log.debug("ignored a late callback of a failed restore: Event loop is closed")
      return
    previous(unraisable)

  hook._omnisage_filter = True
  sys.unraisablehook = hook


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, CORRUPT_DIR))
    self.keep, self.async_save = keep, async_save
    self.corrupt: list[tuple[int, str]] = []   # (step, reason) found by restore_latest
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           enable_async_checkpointing=self.async_save)
    return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    # Fingerprinted before the save starts and before the next step donates the state's buffers.
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        integrity=ocp.args.JsonSave({"fingerprint": fingerprint(state)})), force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state):
    """(state, data_state) of checkpoint `step`, verified; ValueError/OSError when damaged."""
    has_integrity = os.path.isdir(os.path.join(self.directory, str(step), "integrity"))
    args = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if has_integrity:
      args["integrity"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    saved = restored["integrity"]["fingerprint"] if has_integrity else None
    if saved is None:
      log.warning("checkpoint %d has no fingerprints (written before they existed): only its "
                  "values are checked", step)
    verify(restored["state"], saved)
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state, move_aside: bool = False):
    """(step, state, data_state) of the newest checkpoint that restores intact, or None.

    Damaged checkpoints are listed in `self.corrupt`. With `move_aside` (training), those newer
    than the one restored are moved to checkpoints_corrupt/ so their steps can be written again;
    when none restores they stay where they are (see `no_usable_checkpoint`)."""
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as error:  # noqa: BLE001 - any damage must fall back, not crash
        _quiet_closed_loop_callbacks()
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        self.corrupt.append((step, reason))
        log.warning("checkpoint %d in %s is corrupt or partial (%s); falling back to the "
                    "previous one", step, self.directory, reason)
        continue
      if move_aside:
        for bad, _ in self.corrupt:
          self.move_aside(bad)
      return step, state, data_state
    return None

  def move_aside(self, step: int):
    """Moves a damaged step directory to checkpoints_corrupt/<step>-<time> (process 0 only;
    every process then rereads the directory)."""
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      target = os.path.join(self.corrupt_directory, f"{step}-{int(time.time())}")
      shutil.move(os.path.join(self.directory, str(step)), target)
      log.warning("moved checkpoint %d aside to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"omnisage_move_aside_{step}")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


SELECTED = "selected_checkpoint.json"


def select_checkpoint(workdir: str, step: int, **why) -> dict:
  """Records `step` as the workdir's chosen checkpoint (e.g. the best on validation): eval and
  export then use it instead of the newest. `why` is stored with it (metric, value, split)."""
  record = {"step": int(step), **why}
  if jax.process_index() == 0:
    path = os.path.join(workdir, SELECTED)
    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
      json.dump(record, f, indent=1)
    os.replace(f"{path}.tmp-{os.getpid()}", path)
  return record


def selected_step(workdir: str) -> int | None:
  """The step recorded by `select_checkpoint`, or None."""
  path = os.path.join(workdir, SELECTED)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return int(json.load(f)["step"])
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(f"{path}: not a checkpoint selection ({error}); delete it or rerun the "
                     "selection") from error


def no_usable_checkpoint(ckpt: Checkpointer, restart_if_corrupt: bool | None):
  """After `restore_latest` found nothing: nothing to do on a fresh workdir. When checkpoints
  exist but none restored intact, raise CorruptCheckpointError naming the flag that allows a
  fresh start (`restart_if_corrupt` False, or None outside training), or, allowed, move them all
  aside so new checkpoints are written and log that training starts afresh."""
  if not ckpt.corrupt:
    return
  steps = ", ".join(str(step) for step, _ in ckpt.corrupt)
  if not restart_if_corrupt:
    hint = ("Training will not start over silently: rerun with "
            "--config.train.restart_if_corrupt=True to move them aside and train from step 0"
            if restart_if_corrupt is not None else "retrain, or restore a backup of them")
    raise CorruptCheckpointError(
        f"no usable checkpoint in {ckpt.directory}: steps {steps} are corrupt (first: "
        f"{ckpt.corrupt[0][1]}). {hint}")
  for step, _ in ckpt.corrupt:
    ckpt.move_aside(step)
  log.warning("no usable checkpoint (steps %s corrupt, moved to %s): training starts afresh "
              "from step 0 (train.restart_if_corrupt)", steps, ckpt.corrupt_directory)
