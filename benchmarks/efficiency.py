"""Efficiency against the limit: train-step FLOP/s vs a measured matmul peak, and
input-pipeline throughput vs what the train step consumes, all measured in ONE run.

Rows of the table:
  prepare      `launch.py prepare` on the synthetic world (validation, WordPiece tokenisation with
               tensorflow-text, n-gram features + vocabularies, entity tables, pair shards): train
               pairs written per second of the whole prepare. It runs offline, once per dataset.
  tokenise     raw log rows featurised from text one by one (WordPiece query, n-gram ids of the
               positive's title + description), the rate a streaming featuriser would reach.
  grain read   the training input, feature_pipeline.FeatureTrainData's iterator over the examples
               that carry their features (example ArrayRecords -> shuffle -> batched read ->
               decode + pad, shared random negatives from the entity stream): pairs per second.
  train step   the real jitted train step (omnisage/train/omnisearchsage/step.py, trainer.py's
               shardings) on the synthetic config: pairs per second consumed.
Headroom = producer pairs/s / train-step pairs/s; the pipeline is no bottleneck at >= 3x. Each
stage is timed alone (they share the CPU cores when training, so the in-loop margin is smaller).

FLOPs of the train step come from the compiled executable's cost_analysis() (the whole jitted step:
forward + backward + optimiser update, elementwise ops included) and are cross-checked against the
analytic matmul count of omnisage/train/flops.py (towers and logits, training = 3x forward) and the
"6 * query-tower params * query tokens" rule. The peak is a jitted f32 n x n matmul on the same
device in the same process.

Usage:
  .venv/bin/python benchmarks/efficiency.py            # synthetic config: ~5-8 min on 2 cores
  .venv/bin/python benchmarks/efficiency.py --tiny     # tiny config: ~1 min
Prints a table and ends with one JSON line.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import time

import jax

from benchmarks.machine import cpu_summary
from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage import feature_examples, synthetic
from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
from omnisage.data.omnisearchsage.pipeline import task_batch_sizes
from omnisage.data.omnisearchsage.schema import vocab_sizes_of
from omnisage.train import flops as flops_lib
from omnisage.train import sharding
from omnisage.train.host_memory import reuse_freed_host_memory
from omnisage.train.omnisearchsage.state import create_train_state
from omnisage.train.omnisearchsage.step import train_step
from omnisage.train.state import make_optimizer, shardings_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_prepare(config, workdir: str) -> tuple[str, dict]:
  from omnisage.data.omnisearchsage import prepare as prepare_lib
  raw, prepared = os.path.join(workdir, "raw"), os.path.join(workdir, "prepared")
  if not os.path.exists(os.path.join(raw, "queries_log.parquet")):
    synthetic.generate(config.synthetic, config.seed, raw)
  shutil.rmtree(prepared, ignore_errors=True)
  t0 = time.perf_counter()
  summary = prepare_lib.prepare(config, raw, prepared)
  seconds = time.perf_counter() - t0
  pairs = sum(summary["pairs"]["train"].values())
  entities = sum(summary["entities"].values())
  return prepared, {"seconds": round(seconds, 2), "train_pairs": pairs,
                    "pairs_per_second": pairs / seconds, "entities": entities,
                    "stage_seconds": summary["seconds"]}


def measure_featurise(config, raw: str, prepared: str, examples: int) -> dict:
  """Tokenise + n-gram-id `examples` raw log rows from their text, as a streaming featuriser would
  (prepare itself does each distinct query/entity once): the query through WordPiece (TF), the
  positive's title and description through the n-gram vocabulary (a query positive: WordPiece)."""
  import pyarrow.parquet as pq

  from omnisage.data import text, wordpiece  # wordpiece imports TensorFlow
  d = config.data
  log = pq.read_table(os.path.join(raw, "queries_log.parquet"),
                      columns=["query", "entity_kind", "entity_id"]).slice(0, examples).to_pydict()
  texts = {}
  for kind in ("pins", "products"):
    t = pq.read_table(os.path.join(raw, f"{kind}.parquet"), columns=["id", "title", "description"])
    texts[kind] = dict(zip(t["id"].to_pylist(), zip(t["title"].to_pylist(),
                                                    t["description"].to_pylist())))
  tokenizer = wordpiece.QueryTokenizer(os.path.join(prepared, "query_vocab.txt"),
                                       d.query_lower_case, d.query_max_len)
  vocab = text.NgramVocab.load(os.path.join(prepared, "ngram_vocab"))
  tokenizer.tokenize(["warm up"])
  t0 = time.perf_counter()
  # The synthetic log holds injected bad rows (bytes, nulls): prepare drops them, here they are "".
  norm = lambda v: text.normalize(v) if isinstance(v, str) else ""
  queries = [norm(q) for q in log["query"]]
  targets = [norm(e) for k, e in zip(log["entity_kind"], log["entity_id"]) if k == "queries"]
  tokenizer.tokenize(queries + targets)
  for kind, entity in zip(log["entity_kind"], log["entity_id"]):
    for field in texts.get(kind, {}).get(entity, ()):
      if isinstance(field, str):
        vocab.encode(field)
  seconds = time.perf_counter() - t0
  n = len(log["query"])
  return {"examples": n, "seconds": round(seconds, 3), "pairs_per_second": n / seconds}


def measure_grain(config, prepared: str, batches: int) -> dict:
  feature_examples.ensure_feature_examples(config, prepared)
  iterator = FeatureTrainData(config, prepared).iterator()
  next(iterator)   # start-up: threads, file handles, first shuffle
  t0 = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - t0
  pairs = batches * sum(task_batch_sizes(config).values())
  return {"batches": batches, "seconds": round(seconds, 3), "pairs_per_second": pairs / seconds,
          "batch_ms": 1000 * seconds / batches}


def measure_train_step(config, prepared: str, steps: int) -> dict:
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: config.mesh.data * config.mesh.model])
  state, statics = create_train_state(config, vocab_sizes_of(prepared), mesh)
  feature_examples.ensure_feature_examples(config, prepared)
  iterator = FeatureTrainData(config, prepared).iterator()
  # Two distinct batches on the device, reused in turn: the step is timed without Grain's host time
  # and without holding `steps` batches in device memory (large batches on one accelerator).
  batches = [sharding.shard_batch(mesh, next(iterator)) for _ in range(2)]
  shardings = shardings_of(state)
  optimizer = make_optimizer(config.train, config.model)
  step = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer),
                 in_shardings=(None, shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(1,))
  compiled = step.lower(statics, state, batches[0]).compile()
  state, _ = compiled(statics, state, batches[0])   # warm-up
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state, _ = compiled(statics, state, batches[(i + 1) % 2])
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / steps
  devices = config.mesh.data * config.mesh.model
  xla = flops_lib.compiled_flops(compiled)
  pairs = sum(task_batch_sizes(config).values())
  query_params = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                     if "query_tower" in jax.tree_util.keystr(path)
                     and "embeddings" not in jax.tree_util.keystr(path))
  return {"steps": steps, "step_seconds": step_s, "pairs_per_second": pairs / step_s,
          "pairs_per_step": pairs, "devices": devices,
          "xla_flops_per_step": xla * devices if xla else None,
          "query_tower_nonembedding_params": int(query_params)}


def query_tokens_per_step(config) -> int:
  """Tokens through the query tower per step: every query, plus q2query positives/negatives."""
  seq, n = int(config.data.batch_query_len), int(config.loss.random_negatives)
  rows = sum(task_batch_sizes(config).values())
  if config.tasks.q2query > 0:
    rows += int(config.tasks.q2query) + n
  return rows * seq


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="the tiny config (a quick check)")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "efficiency"))
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--read-batches", type=int, default=30, help="timed Grain batches")
  parser.add_argument("--featurise", type=int, default=20_000,
                      help="raw log rows tokenised + n-grammed from text")
  parser.add_argument("--matmul-n", type=int, default=2048, help="side of the peak matmul")
  parser.add_argument("--host-malloc", choices=["reuse", "default"], default="reuse",
                      help="reuse: launch.py's glibc settings (omnisage/train/host_memory.py)")
  args = parser.parse_args()
  # As launch.py does, before JAX or TensorFlow start their thread pools.
  if args.host_malloc == "reuse" and not reuse_freed_host_memory():
    sys.exit("error: --host-malloc reuse needs glibc's mallopt; pass --host-malloc default")
  config = get_config("tiny" if args.tiny else None)
  config.mesh.data, config.mesh.model = 1, 1
  workdir = os.path.join(args.workdir, "tiny" if args.tiny else "synthetic")

  prepared, prep = measure_prepare(config, workdir)
  featurise = measure_featurise(config, os.path.join(workdir, "raw"), prepared, args.featurise)
  grain_r = measure_grain(config, prepared, args.read_batches)
  train = measure_train_step(config, prepared, args.steps)
  peak = flops_lib.measure_matmul_peak(jax.devices()[0], n=args.matmul_n)

  analytic = flops_lib.model_flops(config)
  rule = flops_lib.param_count_flops_estimate(train["query_tower_nonembedding_params"],
                                              query_tokens_per_step(config))
  xla = train["xla_flops_per_step"]
  achieved = xla / train["step_seconds"] if xla else None
  peak_total = peak["flops_per_second"] * train["devices"]
  consumed = train["pairs_per_second"]
  headroom = {"prepare": prep["pairs_per_second"] / consumed,
              "tokenise": featurise["pairs_per_second"] / consumed,
              "grain_read": grain_r["pairs_per_second"] / consumed}

  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{'tiny' if args.tiny else 'synthetic'} config, {train['pairs_per_step']} pairs/step")
  print(f"{'stage':<12} {'pairs/s':>10} {'vs train':>9}   detail")
  print(f"{'prepare':<12} {prep['pairs_per_second']:>10.0f} {headroom['prepare']:>8.1f}x   "
        f"{prep['train_pairs']} pairs + {prep['entities']} entities in {prep['seconds']} s "
        f"{prep['stage_seconds']}")
  print(f"{'tokenise':<12} {featurise['pairs_per_second']:>10.0f} "
        f"{headroom['tokenise']:>8.1f}x   {featurise['examples']} raw rows: WordPiece query + "
        f"n-gram ids of the positive's title/description, from text")
  print(f"{'grain read':<12} {grain_r['pairs_per_second']:>10.0f} "
        f"{headroom['grain_read']:>8.1f}x   {grain_r['batch_ms']:.1f} ms/batch")
  print(f"{'train step':<12} {consumed:>10.0f} {1.0:>8.1f}x   "
        f"{1000 * train['step_seconds']:.1f} ms/step")
  print(f"{'FLOPs':<24} {'per step':>11} {'GFLOP/s':>9}")
  print(f"{'matmul peak f32':<24} {'':>11} {peak['flops_per_second'] / 1e9:>9.1f}   "
        f"n={peak['n']}, per device")
  if xla:
    print(f"{'train step (XLA)':<24} {xla:>11.3e} {achieved / 1e9:>9.1f}   "
          f"{achieved / peak_total:.1%} of the matmul peak")
  print(f"{'analytic (matmuls)':<24} {analytic['total']:>11.3e} "
        f"{analytic['total'] / train['step_seconds'] / 1e9:>9.1f}   "
        + ", ".join(f"{k} {v:.2e}" for k, v in analytic.items() if k != "total"))
  print(f"{'6*N*tokens query tower':<24} {rule:>11.3e}")
  ok = headroom["grain_read"] >= 3
  print(f"input pipeline headroom {headroom['grain_read']:.1f}x: "
        f"{'OK (>= 3x)' if ok else 'BOTTLENECK (< 3x)'}")
  print(json.dumps({
      "benchmark": "efficiency", "config": "tiny" if args.tiny else "synthetic",
      "host_malloc": args.host_malloc,
      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "cpu": cpu_summary(),
      "matmul_peak_gflops": round(peak["flops_per_second"] / 1e9, 2),
      "train_step_gflops": round(achieved / 1e9, 2) if achieved else None,
      "train_step_fraction_of_peak": round(achieved / peak_total, 4) if achieved else None,
      "flops_per_step": {"xla": xla, "analytic": analytic["total"], "six_n_tokens": rule,
                         "xla_over_analytic": round(xla / analytic["total"], 3) if xla else None,
                         "xla_counts": "forward + backward + optimiser (whole jitted step)"},
      "pairs_per_second": {"prepare": round(prep["pairs_per_second"], 1),
                           "tokenise": round(featurise["pairs_per_second"], 1),
                           "grain_read": round(grain_r["pairs_per_second"], 1),
                           "train_step": round(consumed, 1)},
      "headroom": {k: round(v, 2) for k, v in headroom.items()}, "pipeline_ok": ok,
      "step_ms": round(1000 * train["step_seconds"], 1), "prepare": prep, "tokenise": featurise,
      "grain": grain_r}))


if __name__ == "__main__":
  main()
