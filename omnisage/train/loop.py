"""The one training loop of every trained system: resume -> jitted step -> log -> evaluate ->
checkpoint.

Flax-examples shape: a system builds its fresh state, its pure step function and its Grain
iterator, and hands them to `train_loop`, which owns everything a run has in common:

  - resume precedence: the newest checkpoint under <workdir>/checkpoints that restores gives the
    state AND the Grain iterator state (a resumed run reads exactly the batches it would have
    read: MaxText's habit); a damaged one falls back to the one before it (checkpoint.py);
  - the step is jitted ONCE with explicit shardings (the state's, read off the fresh state, and
    P("data") for the batch), with the state donated, so the loop never recompiles;
  - health logs every `train.log_every` steps to <workdir>/train_metrics.jsonl and TensorBoard
    (metrics.py), a progress bar (step/total, loss, examples/s, ETA) on a terminal;
  - the evaluation hook at the start of a fresh run, every `train.eval_every` steps and at the end;
  - checkpoints every `train.checkpoint_every` steps and at the last step, fingerprinted and
    verified on restore (checkpoint.py); when checkpoints exist but none is intact, the run
    refuses to start over unless `train.restart_if_corrupt` says so;
  - a guard against non-finite numbers: a step whose loss or gradient norm is NaN or infinite
    stops the run before anything is checkpointed (`train.nonfinite = "stop"`, the default,
    naming the step and the non-finite metrics), or is skipped, leaving the state as it was
    (`"skip"`, counted in the summary as skipped_updates).

Usage:
  state, summary = train_loop(config, workdir, Trainable(mesh, statics, state, step_fn,
                                                         iterator, examples_per_step=1024))
"""

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from omnisage.train import sharding
from omnisage.train.checkpoint import (
  SELECTED,
  Checkpointer,
  no_usable_checkpoint,
  selected_step,
)
from omnisage.train.metrics import MetricsWriter
from omnisage.train.state import abstract_state, shardings_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainable:
  """What a system hands the loop.

  step_fn(statics, state, batch) -> (state, metrics): pure, jitted here; metrics has "loss".
  evaluate(state) -> {name: float}: scalars logged at step 0 of a fresh run, every
  `train.eval_every` steps and after the last step (None: no evaluation inside training).
  """
  mesh: jax.sharding.Mesh
  statics: Any
  state: Any
  step_fn: Callable
  iterator: Any                     # a Grain DatasetIterator (get_state / set_state)
  examples_per_step: int
  rate_key: str = "examples_per_second"
  log_keys: tuple = ()              # metrics printed next to the loss in the log line
  evaluate: Callable | None = None


def train_loop(config, workdir: str, run: Trainable, progress: bool | None = None):
  """Trains `run.state` to `config.train.steps`; returns (final state, summary).

  summary: steps, resumed_from, final_loss, train_seconds, <rate_key>, and "evaluations":
  {"untrained": ... (fresh runs), "final": ...} when `run.evaluate` is given.
  progress: show the progress bar (None: only when stderr is a terminal).
  """
  os.makedirs(workdir, exist_ok=True)
  train = config.train
  if jax.process_index() == 0:
    # The resolved config beside the checkpoints: eval and export of this workdir need no guess.
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
    if os.path.exists(os.path.join(workdir, SELECTED)):   # more training: choose again
      os.remove(os.path.join(workdir, SELECTED))
      log.info("removed %s: the checkpoints change, select again after training", SELECTED)
  ckpt = Checkpointer(workdir, keep=train.keep_checkpoints,
                      async_save=train.get("async_checkpoint", True))
  writer = MetricsWriter(workdir)
  evaluations = {}
  state = run.state
  restored = ckpt.restore_latest(abstract_state(state), move_aside=True)
  if restored is None:
    no_usable_checkpoint(ckpt, bool(train.get("restart_if_corrupt", False)))
    if run.evaluate is not None:
      evaluations["untrained"] = run.evaluate(state)
      writer.write(0, evaluations["untrained"])
  else:
    _, state, data_state = restored
    run.iterator.set_state(data_state)
    log.info("resumed from step %d", int(state.step))

  shardings = shardings_of(state)
  policy = train.get("nonfinite", "stop")
  if policy not in ("stop", "skip"):
    raise ValueError(f"config field train.nonfinite={policy!r}: one of 'stop', 'skip'")
  step_fn = jax.jit(guarded(run.step_fn, skip=policy == "skip"),
                    in_shardings=(None, shardings, sharding.batch_sharding(run.mesh)),
                    out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=(1,))

  total, eval_every = int(train.steps), int(train.get("eval_every", 0) or 0)
  step = start = int(state.step)
  metrics, pending, skipped = {}, [], 0   # pending: (step, non-finite flag) not yet checked
  bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
             disable=(not sys.stderr.isatty()) if progress is None else not progress,
             mininterval=0.5) if jax.process_index() == 0 else None
  t0 = window_t0 = time.time()
  window_start = step
  with logging_redirect_tqdm(loggers=[logging.getLogger("omnisage")]):
    while step < total:
      state, metrics = step_fn(run.statics, state, sharding.shard_batch(run.mesh,
                                                                        next(run.iterator)))
      step += 1
      pending.append((step, metrics["nonfinite"]))
      if bar is not None:
        bar.update(1)
      checkpoint_now = step % train.checkpoint_every == 0 or step == total
      if step % train.log_every == 0 or checkpoint_now:
        skipped += check_finite(pending, metrics, policy)
        pending = []
      if step % train.log_every == 0 or step == total:
        metrics = jax.device_get(metrics)
        now = time.time()
        rate = (step - window_start) * run.examples_per_step / max(now - window_t0, 1e-9)
        writer.write(step, {**metrics, run.rate_key: rate,
                            "step_seconds": (now - window_t0) / max(step - window_start, 1)})
        window_t0, window_start = now, step
        extra = "".join(f" {k} {float(metrics[k]):.4f}" for k in run.log_keys if k in metrics)
        log.info("step %d loss %.4f%s (%.0f %s)", step, metrics["loss"], extra, rate,
                 run.rate_key.replace("_per_second", "/s"))
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", rate=f"{rate:.0f}/s")
      if run.evaluate is not None and eval_every and step % eval_every == 0 and step < total:
        writer.write(step, run.evaluate(state))
      if checkpoint_now:
        ckpt.save(step, state, run.iterator.get_state())
  if bar is not None:
    bar.close()

  jax.block_until_ready(state)
  seconds = time.time() - t0
  if run.evaluate is not None:
    evaluations["final"] = run.evaluate(state)
    writer.write(step, evaluations["final"])
  ckpt.close()
  writer.close()
  summary = {"steps": step, "resumed_from": None if restored is None else restored[0],
             "final_loss": float(np.asarray(metrics["loss"])) if metrics else None,
             "train_seconds": round(seconds, 2),
             run.rate_key: round((step - start) * run.examples_per_step / max(seconds, 1e-9), 1)}
  if policy == "skip":
    summary["skipped_updates"] = skipped
  if evaluations:
    summary["evaluations"] = evaluations
  return state, summary


class NonFiniteError(ValueError):
  """A training step produced a NaN or infinite loss or gradient norm."""


def guarded(step_fn: Callable, skip: bool) -> Callable:
  """`step_fn` plus a "nonfinite" metric (1 when the loss or gradient norm is NaN or infinite);
  with `skip`, such a step leaves the state as it was except for its step counter."""
  def step(statics, state, batch):
    new, metrics = step_fn(statics, state, batch)
    watched = [metrics["loss"]] + [metrics[k] for k in ("grad_norm",) if k in metrics]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in watched]))
    if skip:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
      new = new.replace(step=state.step + 1)
    return new, {**metrics, "nonfinite": (~finite).astype(jnp.int32)}
  return step


def check_finite(pending: list, metrics: dict, policy: str) -> int:
  """Reads the non-finite flags of the steps since the last check: raises NonFiniteError naming
  the first bad step and the non-finite metrics ("stop"), or returns how many were skipped."""
  flags = jax.device_get([flag for _, flag in pending])
  bad = [step for (step, _), flag in zip(pending, flags) if flag]
  if not bad or policy == "skip":
    return len(bad)
  host = jax.device_get(metrics)
  names = sorted(k for k, v in host.items() if np.size(v) and not np.all(np.isfinite(v)))
  raise NonFiniteError(
      f"step {bad[0]}: non-finite training metrics ({', '.join(names) or 'loss'}); stopped "
      "before checkpointing it. Set --config.train.nonfinite=skip to skip such updates instead")


def restore_for_eval(config, workdir: str, state):
  """(step, state) for evaluation and export: the checkpoint recorded by
  checkpoint.select_checkpoint (the best on validation) when there is one, else the newest that
  restores; FileNotFoundError when there is none."""
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    chosen = selected_step(workdir)
    if chosen is not None:
      if chosen not in ckpt.steps():
        raise FileNotFoundError(f"{workdir}/{SELECTED} selects step {chosen}, which is not among "
                                f"the checkpoints {ckpt.steps()}: rerun the selection")
      return chosen, ckpt.restore(chosen, abstract_state(state))[0]
    restored = ckpt.restore_latest(abstract_state(state))
  finally:
    ckpt.close()
  if restored is None:
    no_usable_checkpoint(ckpt, None)   # checkpoints exist but are all damaged: say so
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  return restored[0], restored[1]


__all__ = ["Trainable", "train_loop", "restore_for_eval", "NonFiniteError"]
