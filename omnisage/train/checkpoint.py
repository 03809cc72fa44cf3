"""Orbax checkpoints: the whole train state plus the Grain iterator state, saved asynchronously.

One checkpoint (a step directory under <workdir>/checkpoints) holds two items:
  state  the TrainState pytree (params, optimiser state, frequency estimator, rng, step)
  data   the Grain iterator state (JSON), so a resumed run reads exactly the batches an
         uninterrupted run would have read (MaxText does the same).
Orbax writes each step to a temporary directory and renames it when complete, so a save cut short
by a crash is never mistaken for a checkpoint. A finished checkpoint that is later damaged (a
truncated or deleted file) fails to restore: `restore_latest` then warns and falls back to the
previous one.

Usage:
  ckpt = Checkpointer(workdir, keep=3)
  restored = ckpt.restore_latest(abstract_state)   # None on a fresh workdir
  ckpt.save(step, state, iterator.get_state())
"""

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state):
    """(step, state, data_state) of the newest checkpoint that restores, or None if none does."""
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except Exception as error:  # noqa: BLE001 - any damage must fall back, not crash
        log.warning("checkpoint %d in %s is corrupt or partial (%s: %s); falling back to the "
                    "previous one", step, self.directory, type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "")
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
