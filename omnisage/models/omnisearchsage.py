"""The OmniSearchSage model: query tower, shared pin/product tower, learned temperature (SPEC §1).

One query embedding is trained against pins, products and queries (query -> query reuses the query
tower) and against the frozen legacy vectors (compat.py). Pins and products share `entity_tower`,
hash table and MLP included. `log_temperature` is t in `s(q, p) = cos(q, p) * exp(t)`, initialised
at config.loss.temperature_init; the loss clips it at config.loss.temperature_max.

Build it inside `jax.set_mesh(mesh)` to place the hash tables row-sharded over "model" right away.

Usage:
  model = build_model(config, {"query": 8000, "ngram": meta["ngram_vocab_size"]})
  q = model.query_tower(query_tokens); p = model.entity_tower(tokens, fields, continuous)

`model.query.lexical` adds the query tower's lexical path (lexical_path.py), which reads the
entity tower's hash table: query_tokens are then packed rows (data/omnisearchsage/query_input.py).
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from omnisage.data.omnisearchsage.query_input import lexical_len
from omnisage.data.omnisearchsage.schema import FIELDS
from omnisage.models.entity_tower import CONTINUOUS_DIM, EntityTower
from omnisage.models.hf_import import query_tower_from_config
from omnisage.models.lexical_path import LexicalChannel, LexicalPath
from omnisage.models.query_tower import QueryTower


class OmniSearchSage(nnx.Module):

  def __init__(self, query_tower: QueryTower, entity_tower: EntityTower, temperature_init: float):
    self.query_tower = query_tower
    self.entity_tower = entity_tower
    self.log_temperature = nnx.Param(jnp.asarray(temperature_init, jnp.float32))


def build_model(config, vocab_sizes: dict) -> OmniSearchSage:
  """The model of a full experiment config; vocab_sizes: {"query": WordPiece size, "ngram": V}."""
  m = config.model
  rngs = nnx.Rngs(params=config.seed)
  query_tower = query_tower_from_config(m, vocab_sizes["query"], rngs)
  entity_tower = EntityTower(vocab_size=vocab_sizes["ngram"], hash_rows=m.hash_rows,
                             text_dim=m.text_dim, num_fields=len(FIELDS),
                             continuous_dim=CONTINUOUS_DIM, mlp_hidden=m.mlp_hidden,
                             embed_dim=m.embed_dim, hash_seed=m.hash_seed, rngs=rngs,
                             legacy_skip=bool(m.get("legacy_skip", False)))
  width = lexical_len(config)
  channel_dim = int(m.get("lexical_dim", 0))
  if channel_dim and not width:
    raise ValueError("model.lexical_dim > 0 needs the query's n-grams: set model.query.lexical")
  if width:   # built last, so a model without it initialises exactly as before
    channel = None
    if channel_dim:   # one module, attached to both towers
      channel = LexicalChannel(m.text_dim, channel_dim, float(m.get("lexical_weight", 0.3)), rngs)
      entity_tower.lexical_channel = nnx.data(channel)
    query_tower.config = dataclasses.replace(query_tower.config, lexical_len=width)
    query_tower.lexical = nnx.data(LexicalPath(entity_tower.hash, m.embed_dim, rngs, channel))
  return OmniSearchSage(query_tower, entity_tower, config.loss.temperature_init)


def output_dim(model_config) -> int:
  """Width of both towers' embeddings: embed_dim, plus the lexical channel's dims when it is on."""
  return int(model_config.embed_dim) + int(model_config.get("lexical_dim", 0))
