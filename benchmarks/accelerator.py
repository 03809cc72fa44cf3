"""Accelerator path: train-step pairs/s and model FLOP utilisation (MFU) at the
largest global batch that fits one accelerator. Driven by benchmarks/accelerator.sh.

Reads pre-tokenised shards (a `launch.py prepare` directory made on a CPU box and carried over), so
the accelerator side needs JAX, Flax, Optax, Grain and PyArrow but NOT TensorFlow; the script checks
that nothing imported it and says so in its JSON line.

The global batch is swept upward (the task mix and the random negatives scaled together by 2x per
row) until the step runs out of device memory or --max-pairs is reached. Per row: the step is
compiled once, a few batches are read ahead (so Grain's host time is not counted), and the steps are
timed. MFU = analytic model FLOPs per step (omnisage/train/flops.py: towers + logits, training = 3x
forward) / step time / peak, against three peaks: a measured f32 matmul (the precision the model
runs at; on NVIDIA GPUs XLA's default precision lets it use TF32), a measured bf16 matmul, and the
datasheet dense TF32 / bf16 peaks of known devices (flops.KNOWN_PEAKS).

Usage:
  benchmarks/accelerator.sh                       # on the GPU box (see the .sh for the shards)
  .venv/bin/python benchmarks/accelerator.py --prepared DIR [--query-size distilbert]
  .venv/bin/python benchmarks/accelerator.py --dry-run --prepared DIR   # tiny config, CPU, 2 steps
Prints a table and ends with one JSON line.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks.efficiency import measure_train_step
from configs.omnisage_synthetic import get_config
from omnisage.data.omnisearchsage.feature_examples import ensure_feature_examples
from omnisage.train import flops as flops_lib

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def scaled(config, scale: int):
  c = config.copy_and_resolve_references()
  for task in ("q2pin", "q2product", "q2query"):
    c.tasks[task] = int(config.tasks[task]) * scale
  c.loss.random_negatives = int(config.loss.random_negatives) * scale
  return c


def base_config(tiny: bool, query_size: str):
  config = get_config("tiny" if tiny else None)
  config.mesh.data, config.mesh.model = 1, 1
  if query_size == "distilbert":   # the production query tower on the synthetic data
    q = config.model.query
    q.hidden, q.layers, q.heads, q.intermediate = 768, 6, 12, 3072
    config.model.text_dim, config.model.mlp_hidden = 256, 1024
  return config


def peaks(device, n: int) -> dict:
  kind = device.device_kind
  f32 = flops_lib.measure_matmul_peak(device, n=n, dtype=jnp.float32)
  bf16 = flops_lib.measure_matmul_peak(device, n=n, dtype=jnp.bfloat16)
  return {"measured_f32": f32["flops_per_second"], "measured_bf16": bf16["flops_per_second"],
          "table_tf32": flops_lib.known_peak(kind, "tf32"),
          "table_bf16": flops_lib.known_peak(kind, "bfloat16")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepared", required=True, help="`launch.py prepare` output directory")
  parser.add_argument("--dry-run", action="store_true", help="tiny config, one batch size, CPU")
  parser.add_argument("--query-size", choices=("synthetic", "distilbert"), default="synthetic")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
  parser.add_argument("--max-pairs", type=int, default=65_536, help="cap of the global batch")
  parser.add_argument("--matmul-n", type=int, default=8192, help="side of the peak matmuls")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.prepared, "meta.json")):
    sys.exit(f"error: {args.prepared}/meta.json not found: make the shards with "
             "`benchmarks/accelerator.sh --prepare-only` on a machine with TensorFlow")
  if args.dry_run:
    args.steps, args.max_pairs, args.matmul_n = min(args.steps, 2), 0, 256
  config = base_config(args.dry_run, args.query_size)
  ensure_feature_examples(config, args.prepared)   # the training input; scaled configs share it
  device = jax.devices()[0]
  peak = peaks(device, args.matmul_n)

  rows, scale, stop = [], 1, "cap"
  while True:
    c = scaled(config, scale)
    pairs = sum(int(c.tasks[t]) for t in ("q2pin", "q2product", "q2query"))
    if rows and pairs > args.max_pairs:
      break
    try:
      r = measure_train_step(c, args.prepared, args.steps)
    except Exception as error:   # noqa: BLE001 - only an out-of-memory ends the sweep quietly
      if not any(m in str(error) for m in OOM_MARKERS):
        raise
      stop = f"out of memory at {pairs} pairs"
      break
    model = flops_lib.model_flops(c)["total"]
    achieved = model / r["step_seconds"]
    rows.append({"pairs": pairs, "random_negatives": int(c.loss.random_negatives),
                 "step_ms": round(1000 * r["step_seconds"], 2),
                 "pairs_per_second": round(r["pairs_per_second"], 1),
                 "model_flops_per_step": model, "xla_flops_per_step": r["xla_flops_per_step"],
                 "model_tflops_per_second": round(achieved / 1e12, 4),
                 "mfu": {k: (round(achieved / v, 4) if v else None) for k, v in peak.items()}})
    m = rows[-1]
    print(f"{pairs:>8} pairs {m['step_ms']:>9.1f} ms {m['pairs_per_second']:>11.0f} pairs/s "
          f"{m['model_tflops_per_second']:>8.3f} TFLOP/s  MFU(f32 matmul) "
          f"{m['mfu']['measured_f32']:.1%}", flush=True)
    scale *= 2

  best = max(rows, key=lambda r: r["pairs_per_second"]) if rows else None
  largest = rows[-1] if rows else None
  tf_imported = any(name == "tensorflow" or name.startswith("tensorflow.") for name in sys.modules)
  print(f"device {device.device_kind} ({jax.default_backend()}); sweep stopped: {stop}")
  print("peaks TFLOP/s: " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in peak.items() if v))
  print(f"{'pairs':>8} {'step ms':>9} {'pairs/s':>10} {'TFLOP/s':>8} "
        f"{'MFU f32':>8} {'MFU bf16':>8} {'MFU tf32*':>9} {'MFU bf16*':>9}   (* datasheet)")
  fmt = lambda v: f"{v:.2%}" if v is not None else "-"
  for r in rows:
    u = r["mfu"]
    print(f"{r['pairs']:>8} {r['step_ms']:>9.1f} {r['pairs_per_second']:>10.0f} "
          f"{r['model_tflops_per_second']:>8.3f} {fmt(u['measured_f32']):>8} "
          f"{fmt(u['measured_bf16']):>8} {fmt(u['table_tf32']):>9} {fmt(u['table_bf16']):>9}")
  print(json.dumps({"benchmark": "accelerator", "dry_run": args.dry_run,
                    "backend": jax.default_backend(), "device": device.device_kind,
                    "query_size": args.query_size, "peaks_flops_per_second": peak,
                    "stopped": stop, "largest": largest, "best": best, "rows": rows,
                    "tensorflow_imported": tf_imported}))
  if tf_imported:
    sys.exit("error: TensorFlow was imported on the accelerator side")


if __name__ == "__main__":
  main()
