"""OmniSearchSage's train state: the model of omnisage.models.omnisearchsage in the shared
TrainState (omnisage/train/state.py), with the optimiser groups of a pretrained query tower.

Usage: `state, statics = create_train_state(config, vocab_sizes, mesh)`.
"""

from omnisage.models import build_model
from omnisage.train.state import Statics, TrainState, create_state, make_optimizer


def create_train_state(config, vocab_sizes: dict, mesh) -> tuple[TrainState, Statics]:
  """Builds the model under `mesh` and a sharded train state from `config.seed`."""
  return create_state(lambda: build_model(config, vocab_sizes),
                      make_optimizer(config.train, config.model), mesh, config.seed,
                      config.loss.freq)
