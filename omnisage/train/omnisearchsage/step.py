"""One training step over the global multi-task batch (pure functions; jitted by the trainer).

SPEC §1 "Loss": for every task T (query->pin, query->product, query->query and the compatibility
tasks query->PinSage, query->ItemSage) an in-batch softmax over the GLOBAL batch plus a softmax over
shared random negatives, with logQ correction; the total loss is the sum over tasks. With
`loss.hard_negatives = k`, each row's k hard negatives join its in-batch softmax (no logQ). The
batch arrays are sharded over the mesh axis `data`, so `q @ p.T` inside the loss spans every
device: the compiler inserts the all-gather, there is no hand-written collective.

Task ids index the frequency estimator's hashing (TASK_IDS); compatibility tasks share their
parent's frequency estimate because they score the same positives.

Usage: `state, metrics = train_step(statics, state, batch, config=c, optimizer=o)`; trainer.py
jits it.
"""

import jax
import jax.numpy as jnp
import optax

from omnisage.data.omnisearchsage import schema
from omnisage.models import compat
from omnisage.train import frequency, losses
from omnisage.train.microbatch import data_shards_of, map_in_chunks
from omnisage.train.state import Statics, TrainState

TASK_IDS = {task: i for i, task in enumerate(schema.TASK_ENTITY)}


def embed_positives_and_negatives(model, task: str, batch: dict, chunk_rows: int = 0,
                                  data_shards: int = 1):
  """Tower outputs of one task: queries, positives and shared random negatives.

  chunk_rows > 0 runs each tower call that many rows per device at a time, recomputed in backward
  (microbatch.py): the same embeddings with one chunk's activations in memory instead of all.
  """
  chunked = lambda fn, *arrays: map_in_chunks(fn, arrays, chunk_rows=chunk_rows,
                                              data_shards=data_shards)
  query = lambda tokens: chunked(model.query_tower, tokens)
  q = query(batch["query_tokens"])
  # No random negatives configured (in-batch negatives only): there is nothing to embed.
  has_neg = batch["neg_ids"].shape[0] > 0
  if schema.TASK_ENTITY[task] == "queries":   # query->query: both sides are queries
    n = query(batch["neg_tokens"]) if has_neg else None
    return q, query(batch["pos_tokens"]), n
  entity = lambda prefix: chunked(model.entity_tower, batch[f"{prefix}_tokens"],
                                  batch[f"{prefix}_fields"], batch[f"{prefix}_continuous"])
  return q, entity("pos"), entity("neg") if has_neg else None


def embed_hard_negatives(model, task: str, batch: dict):
  """[B, k, D] embeddings of the rows' hard negatives (None without them): the tower runs over
  the B * k flattened rows."""
  if "hard_ids" not in batch:
    return None
  b, k = batch["hard_ids"].shape
  flat = lambda name: batch[name].reshape((b * k,) + batch[name].shape[2:])
  if schema.TASK_ENTITY[task] == "queries":
    h = model.query_tower(flat("hard_tokens"))
  else:
    h = model.entity_tower(flat("hard_tokens"), flat("hard_fields"), flat("hard_continuous"))
  return h.reshape(b, k, h.shape[-1])


def multitask_loss(model, loss_config, model_config, use_compat: bool, batch: dict,
                   freq_state: frequency.FreqState, chunk_rows: int = 0, data_shards: int = 1):
  """Sum of the task losses, and metrics per task (chunk_rows: embed_positives_and_negatives)."""
  temperature = model.log_temperature[...]
  total = 0.0
  metrics = {}

  def add(name, loss, task_metrics):
    nonlocal total
    total = total + loss
    metrics[f"loss/{name}"] = loss
    for key, value in task_metrics.items():
      metrics[f"{key}/{name}"] = value

  for task, b in batch.items():
    task_id = TASK_IDS[task]
    q, p, n = embed_positives_and_negatives(model, task, b, chunk_rows, data_shards)
    pos_log_q = frequency.log_q(freq_state, task_id, b["pos_ids"])
    common = dict(log_temperature=temperature, temperature_max=loss_config.temperature_max,
                  query_ids=b["query_ids"], pos_ids=b["pos_ids"], pos_log_q=pos_log_q,
                  use_logq=loss_config.logq, impl=loss_config.impl,
                  block_size=loss_config.block_size)
    with_neg = n is not None
    hard = embed_hard_negatives(model, task, b)
    loss, task_metrics = losses.nested_sampled_softmax_loss(
        q, p, neg=n, neg_ids=b["neg_ids"] if with_neg else None,
        neg_log_q=b["neg_log_q"] if with_neg else None,
        hard=hard, hard_ids=b.get("hard_ids"), hard_valid=b.get("hard_valid"),
        nested_dims=tuple(loss_config.nested_dims), nested_weight=loss_config.nested_weight,
        **common)
    add(task, loss, task_metrics)
    if use_compat and "pos_legacy" in b:
      # Compatibility task: the query vector's first compat_dim dims against the frozen legacy
      # vector of the same positive (SPEC: "Compatibility encoders"). Rows whose positive has no
      # legacy vector take no part.
      compat_task = {"q2pin": "q2pinsage", "q2product": "q2itemsage"}[task]
      compat_neg = (dict(neg=compat.legacy_embedding(b["compat_neg_legacy"]),
                         neg_ids=b["compat_neg_ids"], neg_log_q=b["compat_neg_log_q"])
                    if with_neg else {})
      loss, task_metrics = losses.sampled_softmax_loss(
          compat.compat_query(q, model_config.compat_dim), compat.legacy_embedding(b["pos_legacy"]),
          valid=b["pos_has_legacy"], **compat_neg, **common)
      add(compat_task, loss, task_metrics)
  metrics["temperature"] = jnp.exp(jnp.minimum(temperature, loss_config.temperature_max))
  return total, metrics


def update_frequencies(freq_state, batch: dict, step, alpha: float):
  """Folds this batch's positives into the streaming estimate (Yi et al. 2019, Algorithm 2).

  The estimate is updated BEFORE the loss reads it, as in the paper: the first sighting of an item
  already yields a finite gap estimate.
  """
  for task, b in batch.items():
    freq_state = frequency.update(freq_state, TASK_IDS[task], b["pos_ids"], step, alpha)
  return freq_state


def train_step(statics: Statics, state: TrainState, batch: dict, *, config, optimizer):
  """One update on the global batch. Returns (new state, metrics of this step)."""
  step = state.step + 1
  freq_state = update_frequencies(state.freq, batch, step, config.loss.freq.alpha)
  rng, _ = jax.random.split(state.rng)

  def loss_fn(params):
    model = statics.model(params)
    return multitask_loss(model, config.loss, config.model, config.tasks.compat, batch,
                          freq_state, *_chunking(config))

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  new_state = state.replace(step=step, params=params, opt_state=opt_state, freq=freq_state,
                            rng=rng)
  return new_state, metrics


def loss_only(statics: Statics, state: TrainState, batch: dict, *, config):
  """The loss of `batch` at `state` without updating (for tests and evaluation)."""
  freq_state = update_frequencies(state.freq, batch, state.step + 1, config.loss.freq.alpha)
  model = statics.model(state.params)
  return multitask_loss(model, config.loss, config.model, config.tasks.compat, batch, freq_state,
                        *_chunking(config))


def _chunking(config) -> tuple[int, int]:
  """(tower_chunk_rows, data shards) of `config`; configs without the field do not chunk."""
  return int(config.train.get("tower_chunk_rows", 0)), data_shards_of(config)


__all__ = ["train_step", "loss_only", "multitask_loss", "TASK_IDS"]
