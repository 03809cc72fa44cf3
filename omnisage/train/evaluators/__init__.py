"""Evaluators: one small API each (big_vision's evaluators/), built from `config.evals`."""
