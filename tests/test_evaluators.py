"""Evaluators built from config.evals (omnisage/train/evaluators/): the registry, and the
full-corpus evaluator against a NumPy reference on the tiny synthetic world."""

import jax
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
