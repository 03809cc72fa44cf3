"""Train-step throughput of OmniSearchSage on prepared data, several variants side by side.

Measures, in ONE process (this machine is noisy, so only ratios within a run mean much):
  data_ms    host time to produce one multi-task batch (feature_pipeline.FeatureTrainData:
             examples with their features + shared random negatives)
  step_ms    device time of one jitted, sharded train step (after compilation)
  examples/s pairs per second through the step alone

Usage (prepared data from `launch.py prepare` or `make demo`):
  .venv/bin/python benchmarks/train_step.py --prepared runs/demo/prepared [--steps 5]
  XLA_FLAGS=--xla_force_host_platform_device_count=2 ... --mesh-data 2
Prints a table and ends with one JSON line.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax

from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage.feature_examples import ensure_feature_examples
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.data.omnisearchsage.pipeline import task_batch_sizes
from omnisage.data.omnisearchsage.schema import vocab_sizes_of
from omnisage.train import sharding
from omnisage.train.omnisearchsage.state import create_train_state
from omnisage.train.omnisearchsage.step import train_step
from omnisage.train.state import make_optimizer, shardings_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> config overrides (dotted keys). The first row is the demo config as shipped.
VARIANTS = {
    "demo config": {},
    "query tower 256 wide": {"model.query.hidden": 256, "model.query.intermediate": 1024},
    "512 random negatives": {"loss.random_negatives": 512},
    "entity MLP 512": {"model.mlp_hidden": 512},
}


def configured(overrides: dict, mesh_data: int, mesh_model: int):
  config = get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  config.mesh.data, config.mesh.model = mesh_data, mesh_model
  return config


def measure(config, prepared: str, steps: int) -> dict:
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: config.mesh.data * config.mesh.model])
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  iterator = FeatureTrainData(config, prepared).iterator()
  t0 = time.perf_counter()
  batches = [next(iterator) for _ in range(steps + 1)]
  data_s = (time.perf_counter() - t0) / (steps + 1)
  shardings = shardings_of(state)
  optimizer = make_optimizer(config.train, config.model)
  step = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer),
                 in_shardings=(None, shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(1,))
  state, _ = step(statics, state, sharding.shard_batch(mesh, batches[0]))   # compile
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for batch in batches[1:]:
    state, _ = step(statics, state, sharding.shard_batch(mesh, batch))
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / steps
  examples = sum(task_batch_sizes(config).values())
  return {"data_ms": round(1000 * data_s, 1), "step_ms": round(1000 * step_s, 1),
          "examples_per_second": round(examples / step_s, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepared", default=os.path.join(ROOT, "runs", "demo", "prepared"))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--mesh-data", type=int, default=1)
  parser.add_argument("--mesh-model", type=int, default=1)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated subset of: " + ", ".join(VARIANTS))
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.prepared, "meta.json")):
    sys.exit(f"error: {args.prepared}/meta.json not found: run `make demo` or `launch.py prepare`")
  ensure_feature_examples(get_config(), args.prepared)   # the variants share the examples
  results = {}
  print(f"{'variant':<24} {'data ms':>8} {'step ms':>8} {'examples/s':>11}")
  for name in args.variants.split(","):
    overrides = VARIANTS[name]
    config = configured(overrides, args.mesh_data, args.mesh_model)
    results[name] = measure(config, args.prepared, args.steps)
    r = results[name]
    print(f"{name:<24} {r['data_ms']:>8} {r['step_ms']:>8} {r['examples_per_second']:>11}",
          flush=True)
  print(json.dumps({"benchmark": "train_step",
                    "mesh": {"data": args.mesh_data, "model": args.mesh_model},
                    "backend": jax.default_backend(), "results": results}))


if __name__ == "__main__":
  main()
