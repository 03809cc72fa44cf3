"""PinText training (SPEC §2): one shared word dictionary, the multitask hinge loss, Adagrad.

The step: per task, a batch of (query, positive item) pairs and rho random catalogue items per
pair (omnisage/data/pintext/pipeline.py); entities are averages of dictionary rows
(models/pintext.py); the objective is the sum over tasks of the hinge loss (margin_loss.py);
Adagrad (StarSpace's optimiser) updates the dictionary, then the rows are projected back into the
radius-gamma ball. The state is the shared TrainState (no logQ estimator) and the loop the shared
one (omnisage/train/loop.py). Sharding (sharding.py's table):

  | array                              | spec             |
  |------------------------------------|------------------|
  | dictionary D [rows, d] + Adagrad   | P("model", None) |
  | every batch array [B, ...]         | P("data")        |
  | step                               | P()              |

Evaluation (validation ranking, WANDS kNN) is omnisage/train/evaluators/pintext.py.

Usage: `python launch.py train --config=configs/pintext.py --workdir=runs/pintext/multitask`.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omnisage.data.pintext import pairs as pintext_pairs
from omnisage.data.pintext.pipeline import load_catalogues, train_iterator
from omnisage.data.workdir import prepared_dir_of
from omnisage.models.pintext import PinText, padded_rows, table_to_numpy
from omnisage.train import margin_loss, sharding
from omnisage.train.evaluators.pintext import Evaluator
from omnisage.train.loop import Trainable, restore_for_eval, train_loop
from omnisage.train.state import Statics, TrainState, create_state

log = logging.getLogger(__name__)


def make_optimizer(config) -> optax.GradientTransformation:
  return optax.adagrad(config.train.learning_rate)


def create_pintext_state(config, vocab_size: int, mesh) -> tuple[TrainState, Statics]:
  """A fresh state from config.seed, every array born with its sharding (table P("model"))."""
  make_model = lambda: PinText(padded_rows(vocab_size), config.model.dim, config.model.init_scale,
                               nnx.Rngs(config.seed))
  return create_state(make_model, make_optimizer(config), mesh, config.seed)


def multitask_loss(model: PinText, batch: dict, loss_config) -> tuple[jax.Array, dict]:
  """Sum over tasks of the hinge loss (SPEC §2 "Multitask objective")."""
  total, metrics = 0.0, {}
  for task, b in batch.items():
    loss, m = margin_loss.hinge_loss(model.embed(b["query"]), model.embed(b["pos"]),
                                     model.embed(b["neg"]), loss_config.margin, b["neg_mask"])
    total = total + loss
    metrics[f"loss/{task}"] = loss
    metrics.update({f"{k}/{task}": v for k, v in m.items()})
  return total, metrics


def train_step(statics: Statics, state: TrainState, batch: dict, *, config, optimizer):
  """One Adagrad update on the global multi-task batch, then the ball projection."""
  def loss_fn(params):
    return multitask_loss(statics.model(params), batch, config.loss)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda t: margin_loss.project_to_ball(t, config.loss.radius), params)
  table = jax.tree.leaves(params)[0]
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 max_row_norm=jnp.max(jnp.linalg.norm(table, axis=-1)))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def build(config, workdir: str):
  """(prepared dir, vocab, mesh, fresh state, statics) of a config and workdir."""
  prepared = prepared_dir_of(config, workdir)
  vocab = pintext_pairs.read_vocab(prepared)
  mesh = sharding.make_mesh(config.mesh)
  data = sharding.data_axis_size(mesh)
  if config.train.batch_per_task % data:
    raise ValueError(f"train.batch_per_task={config.train.batch_per_task} must be divisible by "
                     f"the data axis ({data} devices)")
  state, statics = create_pintext_state(config, len(vocab), mesh)
  return prepared, vocab, mesh, state, statics


def train(config, workdir: str) -> dict:
  prepared, vocab, mesh, state, statics = build(config, workdir)
  iterator = train_iterator(config, prepared, load_catalogues(config, prepared))
  log.info("mesh %s, dictionary %d words x %d, tasks %s", dict(mesh.shape), len(vocab) - 1,
           config.model.dim, list(config.tasks))
  step_fn = functools.partial(train_step, config=config, optimizer=make_optimizer(config))
  run = Trainable(mesh, statics, state, step_fn, iterator,
                  examples_per_step=config.train.batch_per_task * len(config.tasks),
                  rate_key="pairs_per_second",
                  log_keys=tuple(f"loss/{t}" for t in config.tasks))
  state, summary = train_loop(config, workdir, run)
  table = table_to_numpy(jax.tree.leaves(state.params)[0])
  final = Evaluator(config, prepared=prepared, vocab=vocab).evaluate_table(table)
  return {**summary, "variant": config.variant, "tasks": list(config.tasks), **final}


def latest_table(config, workdir: str) -> tuple[int, list[str], np.ndarray, np.ndarray]:
  """(step, vocab, trained table, untrained table of the same seed) of the newest checkpoint."""
  _, vocab, _, state, _ = build(config, workdir)
  untrained = table_to_numpy(jax.tree.leaves(state.params)[0])
  step, trained = restore_for_eval(config, workdir, state)
  return step, vocab, table_to_numpy(jax.tree.leaves(trained.params)[0]), untrained


def evaluate(config, workdir: str) -> dict:
  step, vocab, trained, untrained = latest_table(config, workdir)
  prepared = prepared_dir_of(config, workdir)
  rows = {"trained": trained, "random": untrained}
  evaluator = Evaluator(config, prepared=prepared, vocab=vocab)
  out = {name: evaluator.evaluate_table(t) for name, t in rows.items()}
  print(f"PinText {config.variant} (step {step}): WANDS kNN leave-one-out, exact search")
  print(f"{'model':<9} {'P@1':>6} {'P@1 answerable':>15} {'coverage':>9} {'val R@10':>9}")
  for name, r in out.items():
    w = r["wands"]
    print(f"{name:<9} {w['precision@1']:>6.3f} {w['precision@1_answerable']:>15.3f} "
          f"{w['coverage']:>9.3f} {r['validation']['mean_recall@10']:>9.3f}")
  return {"step": step, "variant": config.variant, **out}


