"""Shared fixtures: the tiny synthetic world, generated and prepared once per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY_CONFIG = os.path.join(ROOT, "configs", "omnisage_synthetic.py")


def tiny_config():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import omnisage_synthetic
  return omnisage_synthetic.get_config("tiny")


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
  """(config, prepared_dir) of the tiny synthetic world."""
  from omnisage.data import prepare, synthetic
  config = tiny_config()
  root = tmp_path_factory.mktemp("tiny_world")
  raw = str(root / "raw")
  synthetic.generate(config.synthetic, config.seed, raw)
  prepared = str(root / "prepared")
  prepare.prepare(config, raw, prepared)
  return config, prepared


def subprocess_env(devices: int | None = None) -> dict:
  """Environment for a child Python: the repo importable, and N simulated CPU devices.

  XLA_FLAGS must be set before JAX is imported, hence a child process per device count.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env
