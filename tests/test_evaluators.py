"""Evaluators built from config.evals (omnisage/train/evaluators/): the registry, and the
full-corpus evaluator against a NumPy reference on the tiny synthetic world."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omnisage.data.omnisearchsage.pipeline import load_stores
from omnisage.data.omnisearchsage.schema import vocab_sizes_of
from omnisage.train import sharding
from omnisage.train.evaluators import build_evaluators, run_all
from omnisage.train.evaluators.corpus import reference_metrics
from omnisage.train.omnisearchsage.state import create_train_state


@pytest.fixture(scope="module")
def world(tiny_prepared):
  config, prepared = tiny_prepared
  config = ml_collections.ConfigDict(config.to_dict())   # unlocked copy: evals are edited here
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  return config, prepared, mesh, state, statics, load_stores(prepared, config.data)


def test_unknown_evaluator_type_is_a_clear_error(world):
  config, prepared, mesh, *_ = world
  config.evals = {"x": {"type": "nope"}}
  with pytest.raises(ValueError, match="config.evals.x.type='nope'"):
    build_evaluators(config, prepared=prepared, mesh=mesh)


def test_recall_and_corpus_from_config(world):
  config, prepared, mesh, state, statics, stores = world
  config.evals = {"recall": {"type": "recall"},
                  "corpus": {"type": "corpus", "task": "q2product", "k": 10}}
  evaluators = build_evaluators(config, prepared=prepared, mesh=mesh, stores=stores)
  assert sorted(evaluators) == ["corpus", "recall"]
  scalars = run_all(evaluators, statics, state.params)
  assert {"recall@10/q2pin", "recall@10/q2product", "corpus/q2product/recall@10",
          "corpus/q2product/pair_recall@10"} <= set(scalars)
  assert all(0.0 <= v <= 1.0 for v in scalars.values())

  # The same metric by hand: the model's towers, every product scored, a plain loop.
  corpus = evaluators["corpus"]
  model = statics.model(state.params)
  q = np.asarray(model.query_tower(corpus.queries.astype(np.int32)))
  products = stores["products"].gather(np.arange(stores["products"].size), "e")
  p = np.asarray(model.entity_tower(products["e_tokens"], products["e_fields"],
                                    products["e_continuous"]))
  expected = reference_metrics(q @ p.T, corpus.positives, k=10)
  assert scalars["corpus/q2product/recall@10"] == pytest.approx(expected["recall@10"], abs=1e-6)
  assert scalars["corpus/q2product/pair_recall@10"] == pytest.approx(expected["pair_recall@10"],
                                                                     abs=1e-6)
  # Positives grouped by query: as many rows as distinct token rows, none empty.
  assert len(corpus.positives) == len(corpus.queries) > 1
  assert all(corpus.positives)


def test_a_nan_model_is_refused_not_scored(world):
  """The issue's failure: a model whose parameters are NaN reported Recall@10 = 1.0."""
  config, prepared, mesh, state, statics, stores = world
  config.evals = {"recall": {"type": "recall"}, "corpus": {"type": "corpus"}}
  nan_params = jax.tree.map(lambda p: p * np.nan if jnp.issubdtype(p.dtype, jnp.floating) else p,
                            state.params)
  for name, evaluator in build_evaluators(config, prepared=prepared, mesh=mesh,
                                          stores=stores).items():
    with pytest.raises(ValueError, match="NaN or infinite"):
      evaluator.run(statics, nan_params)


def test_nonfinite_scores_rank_last():
  from omnisage.train.evaluators.corpus import corpus_metrics
  from omnisage.train.evaluators.pintext import ranks_of
  from omnisage.train.evaluators.recall import ranks_against_index
  q = jnp.array([[np.nan, 0.0], [1.0, 0.0]], jnp.float32)
  pos = jnp.array([[1.0, 0.0], [1.0, 0.0]], jnp.float32)
  index = jnp.array([[0.5, 0.0], [np.nan, 0.0], [0.1, 0.0]], jnp.float32)
  ranks = np.asarray(ranks_against_index(q, pos, index, jnp.array([10, 11]),
                                         jnp.array([0, 1, 2])))
  assert ranks.tolist() == [4, 1]   # NaN positive: last of 3 + 1; NaN index item beats nothing
  assert ranks_of(np.array([np.nan, 0.5]), np.array([[0.1, 0.2], [np.nan, 0.9]])).tolist() == [3, 2]
  nan_scores = np.full((2, 5), np.nan)
  m = corpus_metrics(lambda rows: nan_scores[rows], [[0], [1, 2]], k=3)
  assert m["recall@3"] == 0.0 and m["pair_recall@3"] == 0.0


def test_json_lines_are_strict_json():
  import json

  from omnisage.train.metrics import json_line
  line = json_line({"train": {"final_loss": float("nan"), "steps": 3, "r": [1.0, float("inf")]}})
  assert json.loads(line) == {"train": {"final_loss": None, "steps": 3, "r": [1.0, None]},
                              "nonfinite_values": ["train.final_loss", "train.r[1]"]}
