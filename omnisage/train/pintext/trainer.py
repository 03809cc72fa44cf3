"""PinText training, evaluation and export (SPEC §2); `launch.py` calls these four functions.

  prepare(config, workdir)       word-id pairs per task -> <workdir>/prepared (pintext_pairs.py)
  train(config, workdir)         Grain pipeline -> one jitted, sharded step -> Orbax checkpoints
  evaluate(config, workdir)      validation ranking + WANDS kNN of the newest checkpoint, printed
  export(config, workdir, out)   vocab + vectors + manifest: a bundle that embeds any text

The step: per task, a batch of (query, positive item) pairs and rho random catalogue items per
pair; entities are averages of dictionary rows (models/pintext.py); the objective is the sum over
tasks of the hinge loss (margin_loss.py); Adagrad (StarSpace's optimiser) updates the dictionary,
then the rows are projected back into the radius-gamma ball. Sharding (sharding.py's table):

  | array                              | spec             |
  |------------------------------------|------------------|
  | dictionary D [rows, d] + Adagrad   | P("model", None) |
  | every batch array [B, ...]         | P("data")        |
  | step                               | P()              |

Data: per task, Parquet pairs -> this host's slice -> shuffle (reseeded every epoch) -> repeat ->
batch; the task streams are zipped and one RandomMap draws the negatives. Every random choice
derives from (seed, element index), which the Grain iterator state (saved inside each checkpoint)
restores: a resumed run is bit-identical to an uninterrupted one.

WANDS evaluation (SPEC §2 "kNN query -> interest classification"): each query's nearest OTHER
query by cosine (exact brute-force search, 474 x 474) predicts its class; leave-one-out
precision@1. Ties go to the lowest query index (file order). `answerable` restricts to queries
whose class has another member (98 of WANDS' 188 classes are singletons and can never be hit).

Usage: `python launch.py train --config=configs/pintext.py --workdir=runs/pintext/multitask`.
"""

import functools
import logging
import os
import time

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from grain.experimental import ZipMapDataset
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnisage.data.pintext import pairs as pintext_pairs
from omnisage.models.pintext import (
  PinText,
  TextEmbedder,
  average,
  padded_rows,
  table_to_numpy,
  write_bundle,
)
from omnisage.train import margin_loss, sharding
from omnisage.train.checkpoint import Checkpointer
from omnisage.train.metrics import MetricsWriter

log = logging.getLogger(__name__)
STEPS_LIMIT = 1 << 40   # batches per task stream; far beyond any run


def prepared_dir_of(config, workdir: str) -> str:
  return config.data.prepared_dir or os.path.join(workdir, "prepared")


def prepare(config, workdir: str) -> dict:
  t0 = time.time()
  out = prepared_dir_of(config, workdir)
  meta = pintext_pairs.prepare_pairs(config, out)
  return {"prepared_dir": out, **meta, "seconds": round(time.time() - t0, 2)}


# --- data ------------------------------------------------------------------------------------
class _Rows:
  """A random-access Grain source over row-aligned NumPy arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


class AddItemsAndNegatives(grain.transforms.RandomMap):
  """Positive item words from the catalogue, and rho uniform random catalogue items per pair."""

  def __init__(self, tasks, catalogues: dict[str, np.ndarray], negatives: int):
    self.tasks, self.catalogues, self.rho = tasks, catalogues, negatives

  def random_map(self, per_task: tuple, rng: np.random.Generator) -> dict:
    out = {}
    for task, pairs in zip(self.tasks, per_task):
      catalogue = self.catalogues[task]
      rows = pairs["item_row"]
      neg = rng.integers(0, len(catalogue), (len(rows), self.rho))
      out[task] = {"query": pairs["query"], "pos": catalogue[rows], "neg": catalogue[neg],
                   "neg_mask": neg != rows[:, None]}   # False: the negative IS the positive
    return out


def load_catalogues(config, prepared: str) -> dict[str, np.ndarray]:
  return {t: pintext_pairs.read_catalogue(prepared, t, config.data.item_len)
          for t in config.tasks}


def train_iterator(config, prepared: str, catalogues) -> grain.DatasetIterator:
  count, index = jax.process_count(), jax.process_index()
  if config.train.batch_per_task % count:
    raise ValueError(f"train.batch_per_task={config.train.batch_per_task} is not divisible by "
                     f"{count} hosts")
  streams = []
  for i, task in enumerate(config.tasks):
    pairs = pintext_pairs.read_pairs(prepared, "train", task, config.data.query_len)
    if len(pairs["item_row"]) < config.train.batch_per_task:
      raise ValueError(f"task {task}: {len(pairs['item_row'])} train pairs, fewer than "
                       f"train.batch_per_task={config.train.batch_per_task}")
    ds = grain.MapDataset.source(_Rows(pairs))[index::count]   # each host its own slice
    ds = (ds.seed(config.seed + 1000 * i).shuffle().repeat()
          .batch(config.train.batch_per_task // count, drop_remainder=True))
    streams.append(ds[:STEPS_LIMIT])   # equal (endless) lengths for the zip
  features = AddItemsAndNegatives(list(config.tasks), catalogues, config.loss.negatives)
  ds = ZipMapDataset(parents=streams).random_map(features, seed=config.seed + 7919 * (index + 1))
  return iter(ds.to_iter_dataset())


# --- state and step -------------------------------------------------------------------------
@flax.struct.dataclass
class State:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def make_optimizer(config) -> optax.GradientTransformation:
  return optax.adagrad(config.train.learning_rate)


def create_state(config, vocab_size: int, mesh) -> tuple[State, nnx.GraphDef]:
  """A fresh state from config.seed, every array born with its sharding (table P("model"))."""
  with jax.set_mesh(mesh):
    model = PinText(padded_rows(vocab_size), config.model.dim, config.model.init_scale,
                    nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(config)
    param_specs = nnx.get_partition_spec(params)
    is_spec = lambda x: isinstance(x, P)
    opt_specs = optax.tree_map_params(
        optimizer, lambda _, spec: spec, jax.eval_shape(optimizer.init, params), param_specs,
        transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = State(step=P(), params=param_specs, opt_state=opt_specs)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    init = jax.jit(lambda p: State(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                   out_shardings=shardings)
    return init(params), graphdef


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


def train_step(graphdef, state: State, batch: dict, *, config, optimizer):
  def loss_fn(params):
    return multitask_loss(nnx.merge(graphdef, params), batch, config.loss)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda t: margin_loss.project_to_ball(t, config.loss.radius), params)
  table = jax.tree.leaves(params)[0]
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 max_row_norm=jnp.max(jnp.linalg.norm(table, axis=-1)))
  return State(state.step + 1, params, opt_state), metrics


def jit_step(config, graphdef, state, mesh):
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = functools.partial(train_step, graphdef, config=config, optimizer=make_optimizer(config))
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def abstract(state: State):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def build(config, workdir: str):
  prepared = prepared_dir_of(config, workdir)
  vocab = pintext_pairs.read_vocab(prepared)
  mesh = sharding.make_mesh(config.mesh)
  data = sharding.data_axis_size(mesh)
  if config.train.batch_per_task % data:
    raise ValueError(f"train.batch_per_task={config.train.batch_per_task} must be divisible by "
                     f"the data axis ({data} devices)")
  state, graphdef = create_state(config, len(vocab), mesh)
  return prepared, vocab, mesh, state, graphdef


def train(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  prepared, vocab, mesh, state, graphdef = build(config, workdir)
  catalogues = load_catalogues(config, prepared)
  iterator = train_iterator(config, prepared, catalogues)
  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpoint)
  restored = ckpt.restore_latest(abstract(state))
  if restored is not None:
    _, state, data_state = restored
    iterator.set_state(data_state)
    log.info("resumed from step %d", int(state.step))
  step_fn = jit_step(config, graphdef, state, mesh)
  writer = MetricsWriter(workdir)
  log.info("mesh %s, dictionary %d words x %d, tasks %s", dict(mesh.shape), len(vocab) - 1,
           config.model.dim, list(config.tasks))

  pairs_per_step = config.train.batch_per_task * len(config.tasks)
  step = start = int(state.step)
  total = int(config.train.steps)
  t0 = window_t0 = time.time()
  window_start, metrics = step, {}
  while step < total:
    state, metrics = step_fn(state, sharding.shard_batch(mesh, next(iterator)))
    step += 1
    if step % config.train.log_every == 0 or step == total:
      metrics = jax.device_get(metrics)
      now = time.time()
      rate = (step - window_start) * pairs_per_step / max(now - window_t0, 1e-9)
      writer.write(step, {**metrics, "pairs_per_second": rate})
      log.info("step %d loss %.4f (%s) %.0f pairs/s", step, metrics["loss"],
               " ".join(f"{t} {metrics[f'loss/{t}']:.4f}" for t in config.tasks), rate)
      window_t0, window_start = now, step
    if step % config.train.checkpoint_every == 0 or step == total:
      ckpt.save(step, state, iterator.get_state())
  jax.block_until_ready(state)
  seconds = time.time() - t0
  ckpt.close()
  writer.close()
  table = table_to_numpy(jax.tree.leaves(state.params)[0])
  return {"steps": step, "resumed_from": start or None, "variant": config.variant,
          "tasks": list(config.tasks),
          "final_loss": float(metrics["loss"]) if metrics else None,
          "train_seconds": round(seconds, 2),
          "pairs_per_second": round((step - start) * pairs_per_step / max(seconds, 1e-9), 1),
          "validation": validation(config, prepared, table),
          "wands": wands_eval(prepared, TextEmbedder(vocab, table[:len(vocab)]))}


def latest_table(config, workdir: str) -> tuple[int, list[str], np.ndarray, np.ndarray]:
  """(step, vocab, trained table, untrained table of the same seed) of the newest checkpoint."""
  _, vocab, _, state, _ = build(config, workdir)
  untrained = table_to_numpy(jax.tree.leaves(state.params)[0])
  restored = Checkpointer(workdir, keep=config.train.keep_checkpoints).restore_latest(
      abstract(state))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: run `launch.py train`")
  step, trained, _ = restored
  return step, vocab, table_to_numpy(jax.tree.leaves(trained.params)[0]), untrained


# --- evaluation ------------------------------------------------------------------------------
def validation(config, prepared: str, table: np.ndarray) -> dict:
  """Per task: each validation pair's positive ranked by cosine against `val_candidates` random
  catalogue items (seeded, the positive excluded); Recall@10 and MRR. The model-selection signal
  for mu/rho/gamma (WANDS is never used for it)."""
  out = {}
  rng = np.random.default_rng(config.seed + 17)
  n_cand = config.eval.val_candidates
  for task in config.tasks:
    pairs = pintext_pairs.read_pairs(prepared, "val", task, config.data.query_len)
    catalogue = pintext_pairs.read_catalogue(prepared, task, config.data.item_len)
    rows = pairs["item_row"]
    if not len(rows):
      out[task] = {"pairs": 0}
      continue
    cand = rng.integers(0, len(catalogue) - 1, (len(rows), n_cand))
    cand = cand + (cand >= rows[:, None])   # uniform over the catalogue minus the positive
    q = np.asarray(average(table, pairs["query"]))
    items = np.asarray(average(table, catalogue))
    pos = np.asarray(margin_loss.cosine(q, items[rows]))
    neg = np.asarray(margin_loss.cosine(q[:, None], items[cand]))
    rank = 1 + np.sum(neg >= pos[:, None], axis=1)
    out[task] = {"pairs": len(rows), "recall@10": round(float(np.mean(rank <= 10)), 4),
                 "mrr": round(float(np.mean(1.0 / rank)), 4)}
  scored = [v["recall@10"] for v in out.values() if "recall@10" in v]
  out["mean_recall@10"] = round(float(np.mean(scored)), 4) if scored else None
  return out


def knn_loo_precision_at_1(vectors: np.ndarray, labels: list) -> dict:
  """Leave-one-out 1-NN classification by cosine (exact); ties -> lowest index."""
  x = np.asarray(vectors, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)   # zero rows stay zero
  scores = x @ x.T
  np.fill_diagonal(scores, -np.inf)
  nearest = np.argmax(scores, axis=1)
  labels = np.asarray(labels, object)
  hit = labels[nearest] == labels
  _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
  answerable = counts[inverse] >= 2
  return {"queries": len(labels), "precision@1": round(float(hit.mean()), 4),
          "answerable": int(answerable.sum()),
          "precision@1_answerable": round(float(hit[answerable].mean()), 4),
          "nearest": nearest}


def wands_eval(prepared: str, embedder: TextEmbedder) -> dict:
  queries, classes = pintext_pairs.read_wands(prepared)
  result = knn_loo_precision_at_1(embedder.embed(queries), classes)
  result.pop("nearest")
  return {**result, **embedder.coverage(queries)}


def evaluate(config, workdir: str) -> dict:
  step, vocab, trained, untrained = latest_table(config, workdir)
  prepared = prepared_dir_of(config, workdir)
  rows = {"trained": trained, "random": untrained}
  out = {name: {"wands": wands_eval(prepared, TextEmbedder(vocab, t[:len(vocab)])),
                "validation": validation(config, prepared, t)} for name, t in rows.items()}
  print(f"PinText {config.variant} (step {step}): WANDS kNN leave-one-out, exact search")
  print(f"{'model':<9} {'P@1':>6} {'P@1 answerable':>15} {'coverage':>9} {'val R@10':>9}")
  for name, r in out.items():
    w = r["wands"]
    print(f"{name:<9} {w['precision@1']:>6.3f} {w['precision@1_answerable']:>15.3f} "
          f"{w['coverage']:>9.3f} {r['validation']['mean_recall@10']:>9.3f}")
  return {"step": step, "variant": config.variant, **out}


def export(config, workdir: str, out: str) -> dict:
  step, vocab, trained, _ = latest_table(config, workdir)
  manifest = write_bundle(out, vocab, trained[:len(vocab)], {
      "step": step, "variant": config.variant, "tasks": list(config.tasks),
      "loss": {"margin": config.loss.margin, "negatives": config.loss.negatives,
               "radius": config.loss.radius}})
  return {"bundle": out, "step": step, "vocab_size": manifest["vocab_size"],
          "dim": manifest["dim"]}
