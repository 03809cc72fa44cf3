"""The train state: one plain pytree holding everything an exact resume needs.

  step       int32 scalar, the number of updates applied
  params     nnx.State of the trainable nnx.Params (the towers and the log temperature)
  opt_state  optax state
  freq       streaming frequency-estimator arrays (Yi et al. 2019; SPEC §1): logQ is part of
             the model's training dynamics, so it is checkpointed with it (None: no logQ)
  rng        uint32[2] PRNG key for device-side randomness

Non-trainable constants (the hash-index table) are rebuilt from the config and passed beside it.
The Grain iterator state is saved next to this pytree in the same Orbax checkpoint.

Usage: `state, statics = create_state(lambda: Model(...), optimizer, mesh, seed, config.loss.freq)`.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from omnisage.train import frequency
from omnisage.train.sharding import named_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  freq: frequency.FreqState | None
  rng: jax.Array


@flax.struct.dataclass
class Statics:
  """What the jitted step needs besides the state: the model's structure (static) and its
  non-trainable constants (a traced argument, so large constant tables are not baked into the
  compiled program and keep their sharding)."""
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  constants: nnx.State

  def model(self, params):
    return nnx.merge(self.graphdef, params, self.constants)


_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "embed_norm")


def param_labels(params, model_config=None):
  """Optimizer group of every parameter: "frozen" (the embeddings and the bottom
  `model.query.frozen_layers` layers of the query tower), "pretrained" (the rest of the query
  tower's encoder, a projection head given by `projection_init`, the entity tower's identity-
  initialised legacy path) or "default" (everything trained from scratch, the query tower's
  lexical path included; its hash table is the entity tower's and is labelled there)."""
  q = model_config.query if model_config is not None else None
  frozen = int(q.get("frozen_layers", 0)) if q is not None else 0

  # Heads initialised to a meaningful map (a given projection, the identity legacy path) are
  # fine-tuned gently like pretrained weights; a full learning rate would scramble them at once.
  gentle = {("query_tower", "projection")} if q is not None and q.get("projection_init", "") \
      else set()
  gentle.add(("entity_tower", "legacy_skip"))

  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if tuple(names[:2]) in gentle:
      return "pretrained"
    if names[0] != "query_tower" or names[1] in ("projection", "lexical"):
      return "default"
    if frozen and (names[1] in _EMBEDDINGS or (names[1] == "layers" and int(names[2]) < frozen)):
      return "frozen"
    return "pretrained"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(train_config, model_config=None) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay (SPEC: official code warms up 750 steps, cosine).

  A pretrained query encoder is fine-tuned at `train.pretrained_lr_scale` times the learning rate
  (new layers need a large step, pretrained ones a small one) and frozen weights get no update.
  The groups scale the final updates (weight decay included) rather than splitting the optimizer,
  so the optimizer state keeps the parameters' tree structure and their shardings.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
      end_value=train_config.learning_rate * 0.01)
  # Decay matrices only: biases, LayerNorm scales and the temperature are not shrunk to zero.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  scales = {"default": 1.0, "frozen": 0.0,
            "pretrained": float(train_config.get("pretrained_lr_scale", 1.0))}

  def scale_groups(updates, params):
    labels = param_labels(updates, model_config)
    return jax.tree.map(lambda u, label: u * scales[label], updates, labels)

  transforms = [optax.clip_by_global_norm(train_config.grad_clip),
                optax.adamw(schedule, weight_decay=train_config.weight_decay, mask=decay_mask)]
  if any(v != 1.0 for v in scales.values()) and model_config is not None:
    transforms.append(optax.stateless(scale_groups))
  return optax.chain(*transforms)


def create_state(make_model, optimizer: optax.GradientTransformation, mesh, seed: int,
                 freq_config=None) -> tuple[TrainState, Statics]:
  """A fresh TrainState of `make_model()` built under `mesh`, and its Statics.

  Every array is created inside jit with explicit out_shardings, so it is born where it lives:
  tables keep the P("model", None) their model declared, and so do their optimiser slots.
  `freq_config` (size, num_hashes) adds the streaming frequency estimator (logQ); None: none.
  """
  with jax.set_mesh(mesh):
    graphdef, params, constants = nnx.split(make_model(), nnx.Param, ...)
    shardings = named_shardings(mesh, train_state_specs(optimizer, params, freq_config))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(params):
      freq = None if freq_config is None else frequency.init_freq(freq_config.size,
                                                                  freq_config.num_hashes)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=optimizer.init(params), freq=freq,
                        rng=jax.random.PRNGKey(seed + 1))

    state = init(params)
  return state, Statics(graphdef, constants)


def train_state_specs(optimizer, params, freq_cfg=None) -> TrainState:
  """PartitionSpecs of every state leaf: parameters as the model declared them (see
  omnisage/train/sharding.py), optimiser slots like their parameter, the rest replicated."""
  is_spec = lambda x: isinstance(x, P)
  param_specs = nnx.get_partition_spec(params)
  opt_specs = optax.tree_map_params(
      optimizer, lambda _, spec: spec, jax.eval_shape(optimizer.init, params), param_specs,
      transform_non_params=lambda _: P(), is_leaf=is_spec)
  freq_specs = None
  if freq_cfg is not None:
    freq_shapes = jax.eval_shape(lambda: frequency.init_freq(freq_cfg.size, freq_cfg.num_hashes))
    freq_specs = jax.tree.map(lambda _: P(), freq_shapes)
  return TrainState(step=P(), params=param_specs, opt_state=opt_specs, freq=freq_specs, rng=P())


def shardings_of(state: TrainState):
  """The sharding of every leaf, read off a live state (used as jit in/out shardings)."""
  return jax.tree.map(lambda x: x.sharding, state)


def abstract_state(state: TrainState):
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


__all__ = ["TrainState", "Statics", "create_state", "make_optimizer", "shardings_of",
           "abstract_state", "param_count", "train_state_specs"]
