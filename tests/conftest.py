"""Shared fixtures: the tiny synthetic world, generated and prepared once per test session.

Plain helpers and constants live in tests/helpers.py.
"""

import pytest

from tests.helpers import common_flags, last_json, run_launch, tiny_config


@pytest.fixture(scope="session")
def tiny_prepared(ray_cluster, tmp_path_factory):
  """(config, prepared_dir) of the tiny synthetic world, prepared on the session's Ray cluster."""
  from omnisage.data.omnisearchsage import prepare, synthetic
  config = tiny_config()
  root = tmp_path_factory.mktemp("tiny_world")
  raw = str(root / "raw")
  synthetic.generate(config.synthetic, config.seed, raw)
  prepared = str(root / "prepared")
  prepare.prepare(config, raw, prepared)
  return config, prepared


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


@pytest.fixture(scope="session")
def ray_cluster():
  """A real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one CPU per node),
  started once per session and joined by this process: the Ray jobs under test spread their
  actors over both nodes as they would over hosts. Yields the cluster (`.address` for a child
  `launch.py --config.ray_address=...`)."""
  import os

  import ray
  from ray.cluster_utils import Cluster

  from tests.helpers import ROOT
  # Workers import test modules too (a fault-injecting actor class is pickled by reference):
  # they inherit PYTHONPATH from the raylets, which inherit it from this process.
  saved = os.environ.get("PYTHONPATH")
  os.environ["PYTHONPATH"] = ROOT + (os.pathsep + saved if saved else "")
  if ray.is_initialized():   # a private local Ray that an earlier test's prepare() started
    ray.shutdown()
  node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
  cluster = Cluster(initialize_head=True,
                    head_node_args={**node, "include_dashboard": False})
  try:
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
  finally:
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
      os.environ.pop("PYTHONPATH", None)
    else:
      os.environ["PYTHONPATH"] = saved
