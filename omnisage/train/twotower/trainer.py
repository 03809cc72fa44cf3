"""Home-feed two-tower system (SPEC §3) on MovieLens: prepare, train, evaluate, export.

launch.py calls these for configs with `system = "twotower"` (configs/twotower_movielens.py). The
machinery is OmniSearchSage's: the (data, model) mesh and P("data") batches (sharding.py), the id
tables row-sharded P("model", None) by the model itself (hash_embedding.py), the TrainState pytree
and AdamW schedule (state.py), the streaming logQ estimate (frequency.py), the in-batch sampled
softmax with no random negatives (losses.py), Orbax checkpoints holding the Grain iterator state
(checkpoint.py) and `jax.export` towers (serving/export.py).

Input pipeline (Grain): a MapDataset over example indices of the prepared Parquet shards -> this
host's slice -> shuffle (reseeded every epoch) -> repeat -> batch(global batch / hosts) -> one
vectorised map that gathers the example columns and the catalogue's item features. Its iterator
state is an element index, saved in every checkpoint, so a resumed run reads the same batches.

Loss per step, over the GLOBAL batch of B (user, item) rows: in-batch softmax, logits
cos(u_i, v_j) * exp(t) - log Q(item_j), Q from the streaming estimate updated with the batch's
items first (Yi et al. 2019); columns of the same item or the same user are masked.

Usage:
  prepare(config, workdir); train(config, workdir); evaluate(config, workdir)
  export(config, workdir, out)   # bundle read by omnisage/serving/twotower/bundle.py
"""

import dataclasses
import functools
import json
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omnisage.data.sources import movielens
from omnisage.data.twotower import examples as mlx
from omnisage.models.twotower import ITEM_INPUTS, USER_INPUTS, TwoTower
from omnisage.train import frequency, losses, sharding
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.evaluators import twotower as twotower_eval
from omnisage.train.metrics import MetricsWriter
from omnisage.train.state import (
  Statics,
  TrainState,
  abstract_state,
  make_optimizer,
  param_count,
  state_shardings,
  train_state_specs,
)

log = logging.getLogger(__name__)
TASK_ID = 0          # the frequency estimator's hashing salt of the one (user -> item) task
DATASET = "movielens-latest-small"


# --- prepare -------------------------------------------------------------------------------------
def prepared_dir_of(config, workdir: str) -> str:
  return config.data.prepared_dir or os.path.join(workdir, "prepared")


def movielens_dir_of(config) -> str:
  if config.data.movielens_dir:
    return config.data.movielens_dir
  root = os.environ.get("OMNISAGE_DATASETS") or os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))))), "shared", "datasets")
  return os.path.join(root, DATASET)


def prepare(config, workdir: str) -> dict:
  t0 = time.time()
  ml = movielens.load(movielens_dir_of(config))
  out = prepared_dir_of(config, workdir)
  meta = mlx.prepare_movielens(ml, config.data, out)
  bad = meta["bad_rows"]
  return {"prepared_dir": out, "cut": meta["cut"], "train_examples": meta["train_examples"],
          "eval_users": meta["eval_users"], "eval_positives": meta["eval_positives"],
          "cold_start_eval_users_skipped": meta["cold_start_eval_users_skipped"],
          "items": meta["num_items"], "bad_rows": {"total": bad["total"],
                                                   "by_reason": bad["by_reason"]},
          "seconds": round(time.time() - t0, 2)}


# --- input pipeline ------------------------------------------------------------------------------
class GatherBatch(grain.transforms.Map):
  """A batch of example indices -> the towers' inputs (history genres and item features come
  from the catalogue, so they are stored once per item, not once per example)."""

  def __init__(self, examples: dict, catalogue: mlx.Catalogue):
    self.examples, self.catalogue = examples, catalogue

  def map(self, rows: np.ndarray) -> dict:
    ex = {k: v[rows] for k, v in self.examples.items()}
    return {"user": ex["user"],
            **self.catalogue.user_inputs(ex["hist_items"], ex["hist_age"], ex["user_dense"]),
            **self.catalogue.item_inputs(ex["item"]),
            "item_dense": ex["item_dense"]}   # popularity as of the example's time


def train_dataset(config, examples: dict, catalogue) -> grain.MapDataset:
  n, hosts = len(examples["item"]), jax.process_count()
  batch = int(config.train.batch_size)
  if batch % hosts:
    raise ValueError(f"train.batch_size={batch} is not divisible by {hosts} hosts")
  ds = grain.MapDataset.range(n)[jax.process_index()::hosts]
  return (ds.seed(config.seed).shuffle().repeat()
          .batch(batch // hosts, drop_remainder=True).map(GatherBatch(examples, catalogue)))


def train_iterator(config, examples, catalogue) -> grain.DatasetIterator:
  ds = train_dataset(config, examples, catalogue)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


# --- state and step ------------------------------------------------------------------------------
def build_model(config, meta: dict) -> TwoTower:
  return TwoTower(config.model, num_items=meta["num_items"], num_genres=len(meta["genres"]),
                  title_vocab=meta["title_vocab"], temperature_init=config.loss.temperature_init,
                  rngs=nnx.Rngs(config.seed))


def create_state(config, meta: dict, mesh):
  """(TrainState, Statics, optimizer): every array born with its sharding (as state.py does)."""
  with jax.set_mesh(mesh):
    graphdef, params, constants = nnx.split(build_model(config, meta), nnx.Param, ...)
    optimizer = make_optimizer(config.train)
    freq_cfg = config.loss.freq
    shardings = sharding.state_shardings(mesh, train_state_specs(optimizer, params, freq_cfg))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(params):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=optimizer.init(params),
                        freq=frequency.init_freq(freq_cfg.size, freq_cfg.num_hashes),
                        rng=jax.random.PRNGKey(config.seed + 1))

    state = init(params)
  return state, Statics(graphdef, constants), optimizer


def loss_fn(model, batch: dict, pos_log_q, loss_config):
  u = model.user_tower(*(batch[k] for k in USER_INPUTS))
  v = model.item_tower(*(batch[k] for k in ITEM_INPUTS))
  return losses.sampled_softmax_loss(
      u, v, log_temperature=model.log_temperature[...], temperature_max=loss_config.temperature_max,
      query_ids=batch["user"], pos_ids=batch["item"], pos_log_q=pos_log_q,
      use_logq=loss_config.logq)


def train_step(statics: Statics, state: TrainState, batch: dict, *, config, optimizer):
  """One update on the global batch: (new state, metrics)."""
  step = state.step + 1
  # Updated before the loss reads it (Yi et al.): the first sighting already gives a finite gap.
  freq = frequency.update(state.freq, TASK_ID, batch["item"], step, config.loss.freq.alpha)
  pos_log_q = frequency.log_q(freq, TASK_ID, batch["item"])

  def objective(params):
    return loss_fn(statics.model(params), batch, pos_log_q, config.loss)

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 mean_log_q=pos_log_q.mean())
  decay = jnp.exp(statics.model(params).user_tower.log_decay[...])
  metrics.update({f"decay_days/{i}": decay[i] for i in range(decay.shape[0])})
  return state.replace(step=step, params=params, opt_state=opt_state, freq=freq), metrics


# --- train ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """What train, evaluate and export share besides the state: mesh, prepared data."""
  mesh: jax.sharding.Mesh
  meta: dict
  catalogue: mlx.Catalogue
  prepared: str


def setup(config, workdir: str):
  prepared = prepared_dir_of(config, workdir)
  meta = mlx.read_meta(prepared)
  mesh = sharding.make_mesh(config.mesh)
  state, statics, optimizer = create_state(config, meta, mesh)
  return Run(mesh, meta, mlx.Catalogue.load(prepared), prepared), state, statics, optimizer


def train(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  run, state, statics, optimizer = setup(config, workdir)
  batch_size = int(config.train.batch_size)
  if batch_size % sharding.data_axis_size(run.mesh):
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the data axis "
                     f"({sharding.data_axis_size(run.mesh)} devices)")
  examples = mlx.load_examples(run.prepared)
  iterator = train_iterator(config, examples, run.catalogue)
  log.info("mesh %s, %d parameters, %d examples", dict(run.mesh.shape),
           param_count(state.params), len(examples["item"]))
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpoint)
  restored = ckpt.restore_latest(abstract_state(state))
  if restored is not None:
    _, state, data_state = restored
    iterator.set_state(data_state)
    log.info("resumed from step %d", int(state.step))
  shardings = state_shardings(state)
  step_fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer),
                    in_shardings=(None, shardings, sharding.batch_sharding(run.mesh)),
                    out_shardings=(shardings, sharding.replicated(run.mesh)), donate_argnums=(1,))
  writer = MetricsWriter(workdir)
  total, step = int(config.train.steps), int(state.step)
  start_step, metrics = step, {}
  t0 = window_t0 = time.time()
  window_start = step
  while step < total:
    batch = sharding.shard_batch(run.mesh, next(iterator))
    state, metrics = step_fn(statics, state, batch)
    step += 1
    if step % config.train.log_every == 0 or step == total:
      metrics = jax.device_get(metrics)
      now = time.time()
      rate = (step - window_start) * batch_size / max(now - window_t0, 1e-9)
      writer.write(step, {**metrics, "examples_per_second": rate})
      window_t0, window_start = now, step
      log.info("step %d loss %.4f in-batch accuracy %.3f (%.0f examples/s)", step,
               metrics["loss"], metrics["accuracy_inbatch"], rate)
    if step % config.train.checkpoint_every == 0 or step == total:
      ckpt.save(step, state, iterator.get_state())
  jax.block_until_ready(state)
  train_seconds = time.time() - t0
  ckpt.close()
  writer.close()
  trained = step - start_step
  return {"steps": step, "resumed_from": None if restored is None else restored[0],
          "final_loss": float(np.asarray(metrics["loss"])) if metrics else None,
          "epochs": round(step * batch_size / len(examples["item"]), 2),
          "train_seconds": round(train_seconds, 2),
          "examples_per_second": round(trained * batch_size / max(train_seconds, 1e-9), 1)}


# --- evaluate ------------------------------------------------------------------------------------
def embed_all(fn, inputs: dict, batch_size: int) -> np.ndarray:
  """Runs a jitted tower over dict-of-array inputs in fixed-size (padded) blocks."""
  n = len(next(iter(inputs.values())))
  out = []
  for start in range(0, n, batch_size):
    block = {k: v[start:start + batch_size] for k, v in inputs.items()}
    m = len(next(iter(block.values())))
    padded = {k: np.pad(v, ((0, batch_size - m),) + ((0, 0),) * (v.ndim - 1))
              for k, v in block.items()}
    out.append(np.asarray(fn(padded))[:m])
  return np.concatenate(out)


def model_scores(config, run: Run, statics: Statics, params) -> tuple[np.ndarray, dict]:
  """([U, N] dot products of the evaluation users' vectors (features at the cut) and all items'
  vectors, the evaluation users)."""
  users = mlx.load_eval_users(run.prepared)
  model = statics.model(params)

  @jax.jit
  def user_fn(x):
    return model.user_tower(*(x[k] for k in USER_INPUTS))

  @jax.jit
  def item_fn(x):
    return model.item_tower(*(x[k] for k in ITEM_INPUTS))

  size = int(config.eval.batch_size)
  items = embed_all(item_fn, run.catalogue.item_inputs(np.arange(1, run.catalogue.size + 1)),
                    size)
  user_inputs = run.catalogue.user_inputs(users["hist_items"], users["hist_age"],
                                          users["user_dense"])
  return embed_all(user_fn, user_inputs, size) @ items.T, users


def restore(config, workdir: str, run: Run, state):
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  restored = ckpt.restore_latest(abstract_state(state))
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  return restored[0], restored[1]


def evaluate(config, workdir: str) -> dict:
  """Recall@k of the newest checkpoint and of the untrained model (same seed)."""
  run, state, statics, _ = setup(config, workdir)
  step, trained = restore(config, workdir, run, state)
  ks = tuple(config.eval.ks)
  scores, users = model_scores(config, run, statics, trained.params)
  result = twotower_eval.recall(scores, users, ks)
  untrained = twotower_eval.recall(model_scores(config, run, statics, state.params)[0], users, ks)
  print(f"{'two-tower':<12} " + " ".join(f"Recall@{k} {result[f'recall@{k}']:.4f}" for k in ks)
        + f"   ({result['users']} users, step {step})")
  return {"step": step, "users": result["users"],
          "recall": {k: v for k, v in result.items() if k.startswith("recall")},
          "untrained": {k: v for k, v in untrained.items() if k.startswith("recall")}}


# --- export --------------------------------------------------------------------------------------
def export(config, workdir: str, out_dir: str) -> dict:
  """Bundle of the newest checkpoint (omnisage/serving/twotower/bundle.py documents the layout)."""
  from omnisage.serving.twotower import bundle as twotower_bundle
  if jax.process_count() > 1:
    raise ValueError("export runs in a single process: drop the multi-host flags")
  if not Checkpointer(workdir).steps():
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  run, state, statics, _ = setup(config, workdir)
  step, trained = restore(config, workdir, run, state)
  model = statics.model(trained.params)
  return twotower_bundle.write_bundle(model, run.meta, run.prepared, int(step), out_dir,
                                      config=json.loads(config.to_json()))


__all__ = ["prepare", "train", "evaluate", "export", "train_step", "create_state",
           "train_dataset"]
