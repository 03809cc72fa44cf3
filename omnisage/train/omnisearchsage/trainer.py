"""OmniSearchSage training and evaluation (SPEC §1): `train_and_evaluate(config, workdir)`.

Flax-examples shape: this module builds the run (mesh, fresh state, the Grain pipeline over the
examples that carry their features, the evaluators of `config.evals` with the entity stores they
embed) and hands it to the shared loop
(omnisage/train/loop.py), which resumes, jits the step once, logs, evaluates and checkpoints.
Untrained and final evaluations are written to <workdir>/eval_untrained.json and
eval_trained.json.

Usage:
  summary = train_and_evaluate(config, "runs/demo")
  result = evaluate_checkpoint(config, "runs/demo")   # newest checkpoint vs the untrained model
"""

import functools
import logging
import os

import jax

from omnisage.data.omnisearchsage.feature_examples import ensure_feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.data.omnisearchsage.pipeline import load_stores, task_batch_sizes
from omnisage.data.omnisearchsage.query_input import lexical_len
from omnisage.data.omnisearchsage.schema import vocab_sizes_of
from omnisage.data.workdir import prepared_dir_of
from omnisage.train import sharding
from omnisage.train.evaluators import build_evaluators, run_all
from omnisage.train.loop import Trainable, restore_for_eval, train_loop
from omnisage.train.metrics import json_line
from omnisage.train.omnisearchsage.state import create_train_state
from omnisage.train.omnisearchsage.step import train_step
from omnisage.train.state import make_optimizer, param_count

log = logging.getLogger(__name__)
RECALL = "recall@10/"   # the recall evaluator's metric prefix


def build(config, workdir: str):
  """Mesh, fresh train state, statics and entity stores of a run (shared by train and eval).
  The stores are the evaluators' corpora; training reads no catalogue (feature_pipeline.py)."""
  prepared = prepared_dir_of(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  stores = load_stores(prepared, config.data, lexical_len(config))
  return mesh, state, statics, stores, prepared


def check_divisible(config, mesh):
  data = sharding.data_axis_size(mesh)
  sizes = dict(task_batch_sizes(config), random_negatives=config.loss.random_negatives)
  for name, size in sizes.items():
    if size % data:
      raise ValueError(f"{name}={size} must be divisible by the data axis ({data} devices)")


def per_task(scalars: dict) -> dict:
  """{"recall@10/pins": r, ...} -> {"pins": r, ...} (the JSON files' and summary's form)."""
  return {k[len(RECALL):]: v for k, v in scalars.items() if k.startswith(RECALL)}


def train_and_evaluate(config, workdir: str) -> dict:
  mesh, state, statics, stores, prepared = build(config, workdir)
  check_divisible(config, mesh)
  log.info("mesh %s, %d parameters", dict(mesh.shape), param_count(state.params))
  for kind, store in stores.items():
    if store.truncated:
      log.info("%s: %d of %d rows have more tokens than fit and are truncated", kind,
               store.truncated, store.size)
  evaluators = build_evaluators(config, prepared=prepared, stores=stores, mesh=mesh)

  def evaluate(state):
    scalars = run_all(evaluators, statics, state.params)
    if int(state.step) == 0:   # a fresh run's first evaluation: the untrained model
      _write_json(os.path.join(workdir, "eval_untrained.json"), per_task(scalars))
    return scalars

  step_fn = functools.partial(train_step, config=config,
                              optimizer=make_optimizer(config.train, config.model))
  ensure_feature_examples(config, prepared)   # prepare wrote them; rebuilt if stale
  data = FeatureTrainData(config, prepared)
  run = Trainable(mesh, statics, state, step_fn, data.iterator(),
                  examples_per_step=sum(task_batch_sizes(config).values()),
                  evaluate=evaluate if evaluators else None)
  _, summary = train_loop(config, workdir, run)
  recall = per_task(summary.pop("evaluations", {}).get("final", {}))
  _write_json(os.path.join(workdir, "eval_trained.json"), recall)
  return {**summary, "recall@10": recall}


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Recall@10 of the newest checkpoint next to the untrained model of the same seed."""
  mesh, state, statics, stores, prepared = build(config, workdir)
  evaluators = build_evaluators(config, prepared=prepared, stores=stores, mesh=mesh)
  untrained = per_task(run_all(evaluators, statics, state.params))
  step, trained_state = restore_for_eval(config, workdir, state)
  trained = per_task(run_all(evaluators, statics, trained_state.params))
  recall = {task: {"trained": trained[task], "untrained": untrained[task]} for task in trained}
  print_recall_table(recall)
  return {"step": step, "recall@10": recall}


def print_recall_table(recall: dict):
  if jax.process_index() != 0:
    return
  print(f"{'task':<12} {'untrained':>10} {'trained':>10}   Recall@10")
  for task, r in recall.items():
    print(f"{task:<12} {r['untrained']:>10.3f} {r['trained']:>10.3f}")


def _write_json(path: str, obj):
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(json_line(obj))
