"""Compile-only check (omnisage/train/omnisearchsage/aot.py, `launch.py compile`).

The abstract batch and state must be what training really feeds the step (else the memory report
describes another program), so both are compared with the real ones of the tiny config; the
8-device compile runs in a child process (the simulated device count is fixed at JAX start-up).
"""

import jax
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, last_json, run_launch, tiny_config


def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name), tree)


def test_abstract_batch_matches_the_pipeline(tiny_prepared, tmp_path):
  import shutil

  from omnisage.data.omnisearchsage import feature_examples
  from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
  from omnisage.data.omnisearchsage.hard_negatives import write_table
  from omnisage.train.omnisearchsage.aot import abstract_batch
  config, source = tiny_prepared
  # A private copy: the hard-negatives table below changes the examples built from it.
  prepared = str(tmp_path / "prepared")
  shutil.copytree(source, prepared, ignore=shutil.ignore_patterns(feature_examples.DIRNAME))
  feature_examples.ensure_feature_examples(config, prepared)
  real = next(FeatureTrainData(config, prepared, 0, 1).iterator())
  assert _shapes(abstract_batch(config)) == _shapes(real)
  # With hard negatives every task carries [B, k] slots, with or without a table of its own.
  config = config.copy_and_resolve_references()
  config.loss.hard_negatives = 3
  write_table(f"{prepared}/hard_negatives/q2pin.parquet", [0, 1, 1], [0, 1, 2], "mined")
  feature_examples.ensure_feature_examples(config, prepared)
  real = next(FeatureTrainData(config, prepared, 0, 1).iterator())
  assert "hard_tokens" in real["q2query"] and "hard_fields" in real["q2product"]
  assert _shapes(abstract_batch(config)) == _shapes(real)


def test_abstract_state_matches_create_train_state():
  from omnisage.train import sharding
  from omnisage.train.omnisearchsage.aot import abstract_train_state, config_vocab_sizes
  from omnisage.train.omnisearchsage.state import create_train_state
  config = tiny_config()
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  vocab = config_vocab_sizes(config)
  abstract, statics = abstract_train_state(config, vocab, mesh)
  real, real_statics = create_train_state(config, vocab, mesh)
  assert _shapes(abstract) == _shapes(real)
  specs = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding.spec, tree)
  assert specs(abstract) == specs(real)
  assert _shapes(statics.constants) == _shapes(real_statics.constants)


def test_parse_mesh():
  from omnisage.train.omnisearchsage.aot import parse_mesh
  assert parse_mesh("8x1") == (8, 1) and parse_mesh("4X2") == (4, 2)
  for bad in ("8", "8x", "0x1", "ax1", "8x1x1", ""):
    with pytest.raises(ValueError, match="--mesh"):
      parse_mesh(bad)


def test_compile_tiny_for_8_devices():
  # No XLA_FLAGS: `launch.py compile` must set the simulated device count itself.
  result = run_launch("compile", f"--config={TINY_CONFIG}:tiny", "--mesh=8x1")
  assert result.returncode == 0, result.stderr[-3000:]
  report = last_json(result)["compile"]
  assert report["mesh"] == {"data": 8, "model": 1} and report["simulated"]
  mem = report["per_device"]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes"):
    assert mem[key] > 0, key
  # The donated state is aliased: arguments >= the f32 parameters (+ Adam's two slots) / device.
  assert mem["argument_bytes"] >= 3 * 4 * report["parameters"]
  assert report["fits"]["fits"]
  flops = report["flops"]
  assert flops["per_device_xla"] > 0
  # XLA counts every op (elementwise, optimiser); the analytic count only the matmuls.
  assert flops["global_xla"] >= 0.9 * flops["analytic_global"]
  assert "per device" in result.stdout


def test_compile_bad_mesh_is_a_clean_error():
  result = run_launch("compile", f"--config={TINY_CONFIG}:tiny", "--mesh=8by1")
  assert result.returncode == 2
  assert "error: --mesh='8by1'" in result.stderr and "Traceback" not in result.stderr
  assert "error" in last_json(result)["compile"]
