"""The training loop: data -> jitted sharded step -> logs, evaluations and checkpoints.

Flax-examples shape: `train_and_evaluate(config, workdir)` is the whole job; `launch.py train` only
parses flags and calls it. The step is jitted ONCE with explicit in/out shardings (the state's, read
off the freshly created state, and P("data") for the batch), so the loop never recompiles.

Resuming: the newest restorable checkpoint in <workdir>/checkpoints gives the state and the Grain
iterator state; the run then continues exactly as if it had not stopped (tests/test_resume.py).

Usage: `summary = train_and_evaluate(config, "runs/demo")`.
"""

import functools
import json
import logging
import os
import time

import jax
import numpy as np

from omnisage.data.omnisearchsage.pipeline import TrainData, load_stores, task_batch_sizes
from omnisage.train import sharding
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.evaluators.recall import Evaluator
from omnisage.train.metrics import MetricsWriter
from omnisage.train.omnisearchsage.step import train_step
from omnisage.train.state import (
  abstract_state,
  create_train_state,
  make_optimizer,
  param_count,
  state_shardings,
)

log = logging.getLogger(__name__)


def prepared_dir_of(config, workdir: str) -> str:
  return config.data.prepared_dir or os.path.join(workdir, "prepared")


def vocab_sizes_of(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, "meta.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch.py prepare` first")
  with open(path) as f:
    meta = json.load(f)
  return {"query": int(meta["vocab"]["query"]), "ngram": int(meta["vocab"]["V"])}


def build(config, workdir: str):
  """Mesh, fresh train state, statics and entity stores of a run (shared by train and eval)."""
  prepared = prepared_dir_of(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  stores = load_stores(prepared, config.data)
  return mesh, state, statics, stores, prepared


def check_divisible(config, mesh):
  data = sharding.data_axis_size(mesh)
  sizes = dict(task_batch_sizes(config), random_negatives=config.loss.random_negatives)
  for name, size in sizes.items():
    if size % data:
      raise ValueError(f"{name}={size} must be divisible by the data axis ({data} devices)")


def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  mesh, state, statics, stores, prepared = build(config, workdir)
  check_divisible(config, mesh)
  log.info("mesh %s, %d parameters", dict(mesh.shape), param_count(state.params))
  for kind, store in stores.items():
    if store.truncated:
      log.info("%s: %d of %d rows have more tokens than fit and are truncated", kind,
               store.truncated, store.size)

  data = TrainData(config, prepared, stores)
  iterator = data.iterator()
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpoint)
  evaluator = Evaluator(config, prepared, stores, mesh)
  writer = MetricsWriter(workdir)

  restored = ckpt.restore_latest(abstract_state(state))
  if restored is None:
    untrained = evaluator.evaluate(statics, state.params)
    _write_json(os.path.join(workdir, "eval_untrained.json"), untrained)
    writer.write(0, {f"recall@10/{k}": v for k, v in untrained.items()})
  else:
    step, state, data_state = restored
    iterator.set_state(data_state)
    log.info("resumed from step %d", step)

  shardings = state_shardings(state)
  optimizer = make_optimizer(config.train, config.model)
  step_fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer),
                    in_shardings=(None, shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)),
                    donate_argnums=(1,))

  examples_per_step = sum(task_batch_sizes(config).values())
  total = int(config.train.steps)
  step = int(state.step)
  start_step, t0, window_t0, window_start = step, time.time(), time.time(), step
  metrics = {}
  while step < total:
    batch = sharding.shard_batch(mesh, next(iterator))
    state, metrics = step_fn(statics, state, batch)
    step += 1
    if step % config.train.log_every == 0 or step == total:
      metrics = jax.device_get(metrics)
      now = time.time()
      rate = (step - window_start) * examples_per_step / max(now - window_t0, 1e-9)
      writer.write(step, {**metrics, "examples_per_second": rate,
                          "step_seconds": (now - window_t0) / max(step - window_start, 1)})
      window_t0, window_start = now, step
      log.info("step %d loss %.4f (%.0f examples/s)", step, metrics["loss"], rate)
    if config.train.eval_every and step % config.train.eval_every == 0 and step < total:
      recall = evaluator.evaluate(statics, state.params)
      writer.write(step, {f"recall@10/{k}": v for k, v in recall.items()})
    if step % config.train.checkpoint_every == 0 or step == total:
      ckpt.save(step, state, iterator.get_state())

  jax.block_until_ready(state)
  train_seconds = time.time() - t0
  recall = evaluator.evaluate(statics, state.params)
  writer.write(step, {f"recall@10/{k}": v for k, v in recall.items()})
  _write_json(os.path.join(workdir, "eval_trained.json"), recall)
  ckpt.close()
  writer.close()
  trained_steps = step - start_step
  return {
      "steps": step,
      "resumed_from": None if restored is None else restored[0],
      "final_loss": float(np.asarray(metrics["loss"])) if metrics else None,
      "train_seconds": round(train_seconds, 2),
      "examples_per_second": round(trained_steps * examples_per_step / max(train_seconds, 1e-9), 1),
      "recall@10": recall,
  }


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Recall@10 of the newest checkpoint next to the untrained model of the same seed."""
  mesh, state, statics, stores, prepared = build(config, workdir)
  evaluator = Evaluator(config, prepared, stores, mesh)
  untrained = evaluator.evaluate(statics, state.params)
  restored = Checkpointer(workdir, keep=config.train.keep_checkpoints).restore_latest(
      abstract_state(state))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  step, trained_state, _ = restored
  trained = evaluator.evaluate(statics, trained_state.params)
  recall = {task: {"trained": trained[task], "untrained": untrained[task]} for task in trained}
  return {"step": step, "recall@10": recall}


def _write_json(path: str, obj):
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
