"""Shared fixtures: the tiny synthetic world, generated and prepared once per test session."""

import json
import os
import subprocess
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
  from omnisage.data.omnisearchsage import prepare, synthetic
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


def run_launch(*args, devices=None):
  """`python launch.py ARGS` in a child process; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        env=subprocess_env(devices), capture_output=True, text=True, timeout=600)


def last_json(result) -> dict:
  """The closing JSON line every launch.py subcommand prints."""
  return json.loads(result.stdout.strip().splitlines()[-1])


def common_flags(workdir, prepared):
  # Small evaluations: the serving tests are about bundles, not recall.
  return [f"--config={TINY_CONFIG}:tiny", f"--workdir={workdir}",
          f"--config.data.prepared_dir={prepared}", "--config.eval.index_size=32",
          "--config.eval.max_pairs=16"]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_prepared, tmp_path_factory):
  """(config, prepared, workdir, bundle dir, export summary) after 6 training steps.

  Read-only for the tests that use it (export, embed): copy before modifying.
  """
  config, prepared = tiny_prepared
  workdir = tmp_path_factory.mktemp("bundle_run")
  trained = run_launch("train", *common_flags(workdir, prepared), "--config.train.steps=6")
  assert trained.returncode == 0, trained.stderr[-3000:]
  bundle = str(workdir / "bundle")
  result = run_launch("export", *common_flags(workdir, prepared), f"--out={bundle}")
  assert result.returncode == 0, result.stderr[-3000:]
  return config, prepared, str(workdir), bundle, last_json(result)["export"]
