"""Home-feed two-tower training and evaluation (SPEC §3) on MovieLens.

The machinery is OmniSearchSage's: the (data, model) mesh and P("data") batches (sharding.py), the
id tables row-sharded P("model", None) by the model itself (hash_embedding.py), the TrainState
pytree and AdamW schedule (state.py), the streaming logQ estimate (frequency.py), the sampled
softmax (losses.py) and the shared loop (loop.py: Orbax
checkpoints holding the Grain iterator state). The input pipeline is
omnisage/data/twotower/pipeline.py; the bundle is omnisage/serving/twotower/bundle.py; the
per-user protocol's scoring is protocol.py.

Loss per step, over the GLOBAL batch of B (user, item) rows: in-batch softmax, logits
cos(u_i, v_j) * exp(t) - log Q(item_j), Q from the streaming estimate updated with the batch's
items first (Yi et al. 2019); columns of the same item or the same user are masked. With
`loss.random_negatives` N > 0, plus a second softmax over N catalogue items drawn uniformly on
device from the state's rng (log Q = log(N / catalogue size)), shared by every row: mixed
negatives (Yang et al., WWW 2020), because in-batch negatives are drawn in proportion to
popularity and almost never show a rare film.

Usage: `train(config, workdir[, evaluate=fn])`; `evaluate(config, workdir)`.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omnisage.data.twotower import examples as mlx
from omnisage.data.twotower.pipeline import train_iterator
from omnisage.data.workdir import prepared_dir_of
from omnisage.models.twotower import ITEM_INPUTS, USER_INPUTS, TwoTower
from omnisage.train import frequency, losses, sharding
from omnisage.train.evaluators import build_evaluators
from omnisage.train.loop import Trainable, restore_for_eval, train_loop
from omnisage.train.state import Statics, TrainState, create_state, make_optimizer, param_count

log = logging.getLogger(__name__)
TASK_ID = 0          # the frequency estimator's hashing salt of the one (user -> item) task


def build_model(config, meta: dict) -> TwoTower:
  return TwoTower(config.model, num_items=meta["num_items"], num_genres=len(meta["genres"]),
                  title_vocab=meta["title_vocab"], temperature_init=config.loss.temperature_init,
                  rngs=nnx.Rngs(config.seed))


def loss_fn(model, batch: dict, pos_log_q, loss_config, negatives: dict | None = None):
  """Sampled softmax of the batch; `negatives`: item-tower inputs of random negatives shared by
  every row, with their "item" ids and "log_q" (log of each one's chance to be sampled)."""
  u = model.user_tower(*(batch[k] for k in USER_INPUTS))
  v = model.item_tower(*(batch[k] for k in ITEM_INPUTS))
  neg = {} if negatives is None else {
      "neg": model.item_tower(*(negatives[k] for k in ITEM_INPUTS)),
      "neg_ids": negatives["item"], "neg_log_q": negatives["log_q"]}
  return losses.sampled_softmax_loss(
      u, v, log_temperature=model.log_temperature[...], temperature_max=loss_config.temperature_max,
      query_ids=batch["user"], pos_ids=batch["item"], pos_log_q=pos_log_q,
      use_logq=loss_config.logq, **neg)


def random_negatives(key, items: dict, count: int) -> dict:
  """`count` catalogue items drawn uniformly (with replacement) from the catalogue's item-tower
  inputs `items` (row 0 is padding, never drawn): mixed negatives (Yang et al., WWW 2020) give
  the rare items that in-batch negatives almost never show. Each draw's sampling chance is
  count / catalogue size, so log Q = log(count / size) (losses.py's sign convention)."""
  size = items["item"].shape[0] - 1
  idx = jax.random.randint(key, (count,), 1, size + 1)
  out = {k: v[idx] for k, v in items.items()}
  out["log_q"] = jnp.full((count,), jnp.log(count / size), jnp.float32)
  return out


def train_step(statics: Statics, state: TrainState, batch: dict, *, config, optimizer,
               items: dict | None = None):
  """One update on the global batch: (new state, metrics). `items`: the whole catalogue's
  item-tower inputs, the pool of `loss.random_negatives` (0: in-batch negatives only)."""
  step = state.step + 1
  # Updated before the loss reads it (Yi et al.): the first sighting already gives a finite gap.
  freq = frequency.update(state.freq, TASK_ID, batch["item"], step, config.loss.freq.alpha)
  pos_log_q = frequency.log_q(freq, TASK_ID, batch["item"])
  rng, key = jax.random.split(state.rng)
  count = int(config.loss.get("random_negatives", 0))
  negatives = random_negatives(key, items, count) if count and items is not None else None

  def objective(params):
    return loss_fn(statics.model(params), batch, pos_log_q, config.loss, negatives)

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 mean_log_q=pos_log_q.mean())
  decay = jnp.exp(statics.model(params).user_tower.log_decay[...])
  metrics.update({f"decay_days/{i}": decay[i] for i in range(decay.shape[0])})
  return state.replace(step=step, params=params, opt_state=opt_state, freq=freq, rng=rng), \
      metrics


@dataclasses.dataclass
class Run:
  """What train, evaluate and export share besides the state: mesh, prepared data."""
  mesh: jax.sharding.Mesh
  meta: dict
  catalogue: mlx.Catalogue
  prepared: str


def setup(config, workdir: str):
  """(Run, fresh TrainState, Statics, optimizer) of a config and workdir."""
  prepared = prepared_dir_of(config, workdir)
  meta = mlx.read_meta(prepared)
  mesh = sharding.make_mesh(config.mesh)
  state, statics, optimizer = create_twotower_state(config, meta, mesh)
  return Run(mesh, meta, mlx.Catalogue.load(prepared), prepared), state, statics, optimizer


def create_twotower_state(config, meta: dict, mesh):
  """(fresh TrainState, Statics, optimizer) under `mesh`; every array born with its sharding.
  The learning-rate schedule spans `train.schedule_steps` when set (a run stopped early at the
  step chosen on validation follows the same schedule as the run that chose it)."""
  schedule = config.train
  if int(config.train.get("schedule_steps", 0) or 0):
    schedule = config.train.copy_and_resolve_references()
    schedule.steps = int(config.train.schedule_steps)
  optimizer = make_optimizer(schedule)
  state, statics = create_state(lambda: build_model(config, meta), optimizer, mesh, config.seed,
                                config.loss.freq)
  return state, statics, optimizer


def train(config, workdir: str, evaluate=None) -> dict:
  """Trains to `train.steps` (resuming from the newest checkpoint); `evaluate(statics, params,
  step) -> {name: float}` runs at the start of a fresh run, every `train.eval_every` steps and at
  the end (train_loop's hook)."""
  run, state, statics, optimizer = setup(config, workdir)
  batch_size = int(config.train.batch_size)
  if batch_size % sharding.data_axis_size(run.mesh):
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the data axis "
                     f"({sharding.data_axis_size(run.mesh)} devices)")
  examples = mlx.load_examples(run.prepared)
  log.info("mesh %s, %d parameters, %d examples", dict(run.mesh.shape),
           param_count(state.params), len(examples["item"]))
  items = None
  if int(config.loss.get("random_negatives", 0)):
    items = {k: jnp.asarray(v) for k, v in
             run.catalogue.item_inputs(np.arange(run.catalogue.size + 1)).items()}
  step_fn = functools.partial(train_step, config=config, optimizer=optimizer, items=items)
  trainable = Trainable(run.mesh, statics, state, step_fn,
                        train_iterator(config, examples, run.catalogue),
                        examples_per_step=batch_size, log_keys=("accuracy_inbatch",),
                        evaluate=None if evaluate is None else
                        (lambda s: evaluate(statics, s.params, int(s.step))))
  _, summary = train_loop(config, workdir, trainable)
  summary["epochs"] = round(summary["steps"] * batch_size / len(examples["item"]), 2)
  return summary


def evaluate(config, workdir: str) -> dict:
  """The evaluators of `config.evals` on the newest checkpoint and on the untrained model."""
  run, state, statics, _ = setup(config, workdir)
  step, trained = restore_for_eval(config, workdir, state)
  evaluators = build_evaluators(config, prepared=run.prepared, catalogue=run.catalogue)
  result, untrained = {}, {}
  for evaluator in evaluators.values():
    result.update(evaluator.run(statics, trained.params))
    untrained.update(evaluator.run(statics, state.params))
  ks = tuple(config.eval.ks)
  print(f"{'two-tower':<12} " + " ".join(f"Recall@{k} {result[f'recall@{k}']:.4f}" for k in ks)
        + f"   ({int(result['users'])} users, step {step})")
  return {"step": step, "users": int(result["users"]),
          "recall": {k: v for k, v in result.items() if k.startswith("recall")},
          "untrained": {k: v for k, v in untrained.items() if k.startswith("recall")}}


__all__ = ["train", "evaluate", "setup", "create_twotower_state", "train_step", "loss_fn",
           "build_model"]
