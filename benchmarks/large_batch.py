"""Peak memory and step time of the loss step, dense against blockwise logsumexp, for large batches.

The loss step is value_and_grad of losses.sampled_softmax_loss (in-batch + shared random negatives,
logQ, accidental-hit masks) w.r.t. q, p, the negatives and the temperature, for a global batch of
B pairs with R = negatives_per_pair x B shared random negatives. q, p and the negatives are random
unit [., dim] inputs: the towers are left out, their activations scale with B for both impls and
are not what the impl changes (the B x (B + R) logits are).

Each (B, impl) runs in its own child process, so peak RSS (ru_maxrss) is that configuration's alone:
  est_GB      B x (B + R) x 4 bytes x 2 (logits, softmax weights): dense configurations above
              --dense-max-gb are only compiled (.lower().compile() allocates nothing) and reported
              as "skipped (est. N GB)" with their compiled memory estimate.
  xla_GB      compiled memory_analysis(): temp + argument bytes.
  peak_rss_GB the child's ru_maxrss (includes the Python/JAX runtime, ~0.3 GB).
  step_s      median wall time of up to --steps steps after compilation (fewer when a step is slow,
              see --step-budget-s).
  TFLOP       matmul work of one step: dense 3 x 2 B (B + R) dim (forward, two gradients),
              blockwise 4 x (the backward pass recomputes the logits). Configurations above
              --max-tflop are compiled only; a blockwise one then runs ONE step at --fit-dim
              instead (row "blockwise@<fit-dim>"): its [B, block_size] blocks, which dominate its
              memory, do not depend on dim, so that run shows whether the step fits in RAM, and
              xla_GB of the compiled dim-256 step gives the full-dim buffer plan.

Usage:
  .venv/bin/python benchmarks/large_batch.py                        # 4k ... 64k, both impls
  .venv/bin/python benchmarks/large_batch.py --batches 1024,2048    # a quick look
A full dim-256 step at 64k pairs is ~45 TFLOP blockwise (34 dense): hours on a shared 2-core box,
hence --max-tflop. Defaults take ~20-30 min on a 2-core CPU box under load. Prints a table and
ends with one JSON line (blockwise / dense compiled memory at 32k, whether 64k blockwise ran).
"""

import argparse
import json
import os
import subprocess
import sys
import time

GB = 1e9


def dense_estimate_bytes(batch: int, negatives: int) -> float:
  return batch * (batch + negatives) * 4 * 2


def step_tflop(batch: int, negatives: int, dim: int, impl: str) -> float:
  return (4 if impl == "blockwise" else 3) * 2 * batch * (batch + negatives) * dim / 1e12


def _peak_rss_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KB on Linux (= VmHWM)


def child(spec: dict) -> dict:
  """One configuration, in this (child) process: compile, maybe run, measure."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from omnisage.train import losses

  b, n, dim = spec["batch"], spec["negatives"], spec["dim"]
  rng = np.random.default_rng(0)

  def unit(rows):
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  # Ids from a catalogue 10x the batch: some accidental hits, as in real batches.
  ids = lambda rows: rng.integers(0, 10 * b, rows).astype(np.int32)
  inputs = dict(q=unit(b), p=unit(b), neg=unit(n), t=np.float32(np.log(1 / 0.07)),
                query_ids=ids(b), pos_ids=ids(b), neg_ids=ids(n),
                pos_log_q=rng.uniform(-12, -1, b).astype(np.float32),
                neg_log_q=np.full(n, np.log(n / (10 * b)), np.float32))

  def loss(q, p, neg, t, query_ids, pos_ids, neg_ids, pos_log_q, neg_log_q):
    return losses.sampled_softmax_loss(
      q, p, log_temperature=t, temperature_max=float(np.log(100.0)), query_ids=query_ids,
      pos_ids=pos_ids, pos_log_q=pos_log_q, neg=neg, neg_ids=neg_ids, neg_log_q=neg_log_q,
      impl=spec["impl"], block_size=spec["block_size"])[0]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  start = time.perf_counter()
  compiled = step.lower(*inputs.values()).compile()
  out = dict(compile_s=time.perf_counter() - start)
  memory = compiled.memory_analysis()
  if memory is not None:
    out["xla_bytes"] = memory.temp_size_in_bytes + memory.argument_size_in_bytes
  if spec["compile_only"]:
    return out
  args = [jnp.asarray(v) for v in inputs.values()]
  times, budget_end = [], time.perf_counter() + spec["step_budget_s"]
  for _ in range(spec["steps"]):
    start = time.perf_counter()
    value, _ = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
    if time.perf_counter() > budget_end:
      break
  out.update(step_s=float(np.median(times)), steps=len(times), loss=float(value),
             peak_rss_bytes=_peak_rss_bytes())
  return out


def run_child(spec: dict, timeout_s: float) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  try:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(error=f"timeout after {timeout_s:.0f} s")
  if result.returncode != 0:
    # A kill by the OOM killer shows up as -9 with no Python traceback.
    last = (result.stderr.strip().splitlines() or [""])[-1]
    return dict(error=f"exit {result.returncode}: {last[-200:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="4096,8192,16384,32768,65536")
  parser.add_argument("--impls", default="dense,blockwise")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--negatives-per-pair", type=int, default=4)
  parser.add_argument("--block-size", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--step-budget-s", type=float, default=60.0,
                      help="stop timing steps of a configuration after this much time (>= 1 step)")
  parser.add_argument("--dense-max-gb", type=float, default=6.0,
                      help="compile-only for dense configurations with a larger logit estimate")
  parser.add_argument("--max-tflop", type=float, default=1.0,
                      help="compile-only (plus a blockwise fit run at --fit-dim) above this")
  parser.add_argument("--fit-dim", type=int, default=8)
  parser.add_argument("--timeout-s", type=float, default=3600.0)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return None

  batches = [int(x) for x in args.batches.split(",")]
  impls = args.impls.split(",")
  rows = []
  print(f"{'B':>6} {'R':>7} {'impl':>12} {'TFLOP':>6} {'est_GB':>7} {'xla_GB':>7} "
        f"{'peak_rss_GB':>11} {'step_s':>8}  note")

  def report(row):
    fmt = lambda key, scale=GB, spec=".2f": (
      f"{row[key] / scale:{spec}}" if row.get(key) is not None else "-")
    print(f"{row['batch']:>6} {row['negatives']:>7} {row['impl']:>12} "
          f"{row['tflop']:>6.2f} {fmt('est_bytes', spec='.1f'):>7} {fmt('xla_bytes'):>7} "
          f"{fmt('peak_rss_bytes'):>11} {fmt('step_s', 1.0):>8}  {row['note']}", flush=True)
    rows.append(row)

  for batch in batches:
    negatives = args.negatives_per_pair * batch
    for impl in impls:
      est = dense_estimate_bytes(batch, negatives) if impl == "dense" else None
      tflop = step_tflop(batch, negatives, args.dim, impl)
      too_big = est is not None and est > args.dense_max_gb * GB
      too_slow = tflop > args.max_tflop
      spec = dict(batch=batch, negatives=negatives, dim=args.dim, impl=impl,
                  block_size=args.block_size, steps=args.steps,
                  step_budget_s=args.step_budget_s, compile_only=too_big or too_slow)
      row = dict(batch=batch, negatives=negatives, impl=impl, dim=args.dim, tflop=tflop,
                 est_bytes=est, **run_child(spec, args.timeout_s))
      row["note"] = (row["error"] if "error" in row else
                     f"skipped (est. {est / GB:.0f} GB), compiled only" if too_big else
                     f"compiled only (> {args.max_tflop:g} TFLOP)" if too_slow else "ran")
      report(row)
      if too_slow and not too_big and impl == "blockwise":
        fit = dict(spec, dim=args.fit_dim, steps=1, compile_only=False)
        row = dict(batch=batch, negatives=negatives, impl=f"{impl}@{args.fit_dim}",
                   dim=args.fit_dim, tflop=step_tflop(batch, negatives, args.fit_dim, impl),
                   est_bytes=None, **run_child(fit, args.timeout_s))
        row["note"] = row.get("error", f"fit run: 1 step at dim {args.fit_dim}")
        report(row)

  def find(batch, impl):
    return next((r for r in rows if r["batch"] == batch and r["impl"] == impl), {})

  dense32, block32 = find(32768, "dense"), find(32768, "blockwise")
  ratio = (block32["xla_bytes"] / dense32["xla_bytes"]
           if block32.get("xla_bytes") and dense32.get("xla_bytes") else None)
  block64 = find(65536, "blockwise")
  block64_run = next((r for r in rows if r["batch"] == 65536 and r.get("peak_rss_bytes")
                      and r["impl"].startswith("blockwise")), {})
  # Measured side by side where both ran (RSS includes the inputs and runtime of both).
  rss_ratio = {b: find(b, "blockwise")["peak_rss_bytes"] / find(b, "dense")["peak_rss_bytes"]
               for b in batches
               if find(b, "blockwise").get("peak_rss_bytes")
               and find(b, "dense").get("peak_rss_bytes")}
  summary = dict(
    benchmark="large_batch", dim=args.dim, negatives_per_pair=args.negatives_per_pair,
    block_size=args.block_size,
    blockwise_over_dense_xla_memory_32k=ratio,
    blockwise_over_dense_peak_rss=rss_ratio,
    blockwise_64k_xla_gb=block64["xla_bytes"] / GB if block64.get("xla_bytes") else None,
    blockwise_64k_fits=bool(block64_run),
    blockwise_64k_run=({k: block64_run.get(k) for k in ("impl", "dim", "peak_rss_bytes", "step_s")}
                       if block64_run else None),
    rows=rows,
  )
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
