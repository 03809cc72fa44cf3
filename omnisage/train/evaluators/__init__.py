"""Evaluators: one small API each (big_vision's evaluators/), built from `config.evals`.

Every module here defines `Evaluator(config, **context)` with one method:

  run(statics, params) -> {metric name: float}

`context` holds what a system has at hand (prepared dir, mesh, entity stores, catalogue, ...);
each evaluator takes the keywords it needs and ignores the rest. `config.evals` names them:

  config.evals = {"recall": {"type": "recall"}}      # name -> {"type": module here, **kwargs}

  recall     Recall@10 per task by OmniSearchSage's protocol (SPEC §1 "Evaluation")
  twotower   Recall@k of the home-feed model on the MovieLens evaluation users (SPEC §3)
  pintext    PinText validation ranking and WANDS kNN classification (SPEC §2)
  corpus     full-corpus recall of one task's eval queries (every entity of its kind ranked)

Usage:
  evaluators = build_evaluators(config, prepared=prepared, mesh=mesh, stores=stores)
  scalars = run_all(evaluators, statics, params)
"""

import importlib

TYPES = ("recall", "corpus", "twotower", "pintext")


def build_evaluators(config, **context) -> dict:
  """{name: Evaluator} for each entry of `config.evals` (empty when the config has none)."""
  evaluators = {}
  for name, spec in (config.get("evals") or {}).items():
    spec = dict(spec)
    kind = spec.pop("type", name)
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}.type={kind!r}: one of {', '.join(TYPES)}")
    module = importlib.import_module(f"omnisage.train.evaluators.{kind}")
    evaluators[name] = module.Evaluator(config, **context, **spec)
  return evaluators


def run_all(evaluators: dict, statics, params) -> dict[str, float]:
  """The scalars of every evaluator, in one dict (metric names are unique per evaluator type)."""
  out = {}
  for evaluator in evaluators.values():
    out.update(evaluator.run(statics, params))
  return out
