"""prepare and the training input pipeline at 1x, 5x and 20x the demo world: rows/s and peak memory.

Batch jobs must run past one machine's memory: the peak memory of `prepare` (Ray Data,
omnisage/data/omnisearchsage/prepare.py) and of the training input pipeline (FeatureTrainData,
which streams the examples that carry their features) should stay flat in data size, and prepare
at 1x should be no more than 2x slower than the in-memory prepare it replaced. That one is run
from a git worktree of --in-memory-ref (the last commit that had it) at the scales of
--in-memory-scales.

Each measurement runs in a child process; a sampler in this process adds up the proportional set
size (PSS: shared pages, such as Ray's object store, counted once) of the child and every process
below it (Ray's GCS, raylet and workers included) every 0.2 s, and keeps the maximum. The world is
the demo's synthetic world (configs/omnisage_synthetic.py) with every count (queries, pins,
products, boards, board saves and the three log tables) times the scale; the text vocabulary is
the same. rows/s = raw log rows (queries_log + board_saves) / prepare's wall seconds. prepare
includes writing the feature-carrying examples, which the in-memory prepare did not write:
`slowdown_vs_in_memory` compares the two without that step (prepare's `examples` seconds taken
off), `slowdown_vs_in_memory_with_examples` with it. The
pipeline measurement builds FeatureTrainData on prepare's output and draws --pipeline-batches
batches.

Usage:
  .venv/bin/python benchmarks/prepare_scale.py [--scales 1,5,20] [--in-memory-scales 1,5,20]
Prints a table and ends with one JSON line
  {"prepare_scale": {"scale": {"1": {"prepare_peak_gb", "pipeline_peak_gb", "rows_per_s", ...},
   ...}, ...}}.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SCALED = ("num_queries", "num_pins", "num_products", "num_boards", "num_board_saves",
          "num_query_pin", "num_query_product", "num_query_query")
GB = 1024 ** 3
# The last commit with the in-memory prepare (prepare.py before Ray Data replaced it).
IN_MEMORY_REF = "0c1c4a8dedd8cdf097468cfe45f2558d2f27b6b4"


def scaled_config(scale: float):
  from configs import omnisage_synthetic
  config = omnisage_synthetic.get_config(None)
  for name in SCALED:
    config.synthetic[name] = int(round(config.synthetic[name] * scale))
  return config


# --- children ----------------------------------------------------------------------------------

def child_generate(args) -> dict:
  from omnisage.data.omnisearchsage import synthetic
  config = scaled_config(args.scale)
  out = synthetic.generate(config.synthetic, config.seed, args.raw)
  return {"rows": out["rows"], "seconds": out["seconds"]}


def child_prepare(args) -> dict:
  from omnisage.data.omnisearchsage.prepare import prepare
  config = scaled_config(args.scale)
  config.data.raw_dir, config.data.prepared_dir = args.raw, args.out
  if args.object_store_gb is not None:   # the private Ray's object store (0: Ray's default)
    config.data.ray_object_store_gb = args.object_store_gb
  start = time.perf_counter()
  summary = prepare(config, args.raw, args.out)   # else starts a private Ray in this child
  return {"seconds": time.perf_counter() - start, "pairs": summary.get("pairs"),
          "step_seconds": summary.get("seconds")}


def child_pipeline(args) -> dict:
  from absl import flags
  flags.FLAGS(["prepare_scale"])   # Grain workers read absl flags
  from omnisage.data.omnisearchsage.feature_pipeline import FeatureTrainData
  config = scaled_config(args.scale)
  config.data.prepared_dir = args.out
  start = time.perf_counter()
  data = FeatureTrainData(config, args.out, process_index=0, process_count=1)
  it = data.iterator()
  built = time.perf_counter() - start
  for _ in range(args.pipeline_batches):
    next(it)
  return {"seconds": time.perf_counter() - start, "build_seconds": built,
          "batches": args.pipeline_batches}


CHILDREN = {"generate": child_generate, "prepare": child_prepare, "pipeline": child_pipeline}


# --- the parent: a child under a memory sampler --------------------------------------------------

def tree_memory(proc) -> int:
  """PSS (RSS where PSS is unreadable) of proc and all its descendants, in bytes."""
  import psutil
  total = 0
  for p in [proc] + proc.children(recursive=True):
    try:
      try:
        total += p.memory_full_info().pss
      except (psutil.AccessDenied, AttributeError):
        total += p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
      pass
  return total


def measured(what: str, scale: float, timeout: float, root: str = ROOT, **kwargs) -> dict:
  """Runs one child (this script of the checkout `root`); returns its JSON plus "peak_gb" (the
  process tree's peak PSS)."""
  import psutil
  cmd = [sys.executable, os.path.join(root, "benchmarks", os.path.basename(__file__)),
         "--child", what, "--scale", str(scale)]
  for key, value in kwargs.items():
    if value is not None:
      cmd += [f"--{key.replace('_', '-')}", str(value)]
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=root)
  proc, peak, done = psutil.Process(child.pid), [0], threading.Event()

  def sample():
    while not done.is_set():
      try:
        peak[0] = max(peak[0], tree_memory(proc))
      except psutil.NoSuchProcess:
        return
      done.wait(0.2)
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    out, err = child.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    for p in proc.children(recursive=True) + [proc]:
      p.kill()
    child.communicate()
    done.set()
    return {"error": f"over {timeout:.0f} s", "peak_gb": round(peak[0] / GB, 3)}
  done.set()
  sampler.join()
  if child.returncode != 0:
    return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}",
            "peak_gb": round(peak[0] / GB, 3)}
  result = json.loads(out.strip().splitlines()[-1])
  result["peak_gb"] = round(peak[0] / GB, 3)
  return result


def run_scale(scale: float, args, log) -> dict:
  base = os.path.join(args.workdir, f"x{scale:g}")
  raw, out_ray, out_mem = (os.path.join(base, n) for n in ("raw", "prepared_ray", "prepared_mem"))
  shutil.rmtree(base, ignore_errors=True)
  gen = measured("generate", scale, args.timeout, raw=raw)
  if "error" in gen:
    raise RuntimeError(f"generating the {scale:g}x world: {gen['error']}")
  log_rows = int(gen["rows"]["queries_log"]) + int(gen["rows"]["board_saves"])
  row = {"log_rows": log_rows}
  prep = measured("prepare", scale, args.timeout, raw=raw, out=out_ray,
                  object_store_gb=args.object_store_gb)
  row.update(prepare_peak_gb=prep["peak_gb"], prepare_seconds=round(prep.get("seconds", 0), 1),
             step_seconds=prep.get("step_seconds"))
  if "error" in prep:
    row["error"] = prep["error"]
  else:
    row["rows_per_s"] = round(log_rows / prep["seconds"], 1)
    # Like for like with the in-memory prepare, which wrote no feature examples.
    examples = (prep.get("step_seconds") or {}).get("examples", 0.0)
    row["rows_per_s_without_examples"] = round(log_rows / (prep["seconds"] - examples), 1)
    pipe = measured("pipeline", scale, args.timeout, out=out_ray,
                    pipeline_batches=args.pipeline_batches)
    row.update(pipeline_peak_gb=pipe["peak_gb"], pipeline_seconds=round(pipe.get("seconds", 0), 1))
    if "error" in pipe:
      row["pipeline_error"] = pipe["error"]
  if scale in args.in_memory_scales and args.in_memory_root:
    mem = measured("prepare", scale, args.timeout, root=args.in_memory_root, raw=raw,
                   out=out_mem, engine="local")
    row["in_memory"] = {"prepare_peak_gb": mem["peak_gb"]}
    if "error" in mem:
      row["in_memory"]["error"] = mem["error"]
    else:
      row["in_memory"].update(prepare_seconds=round(mem["seconds"], 1),
                              rows_per_s=round(log_rows / mem["seconds"], 1))
  if not args.keep:
    shutil.rmtree(base, ignore_errors=True)
  log(f"  {scale:g}x: {json.dumps(row)}")
  return row


def in_memory_checkout(ref: str, directory: str) -> str:
  """A detached git worktree of `ref` (the in-memory prepare) at `directory`; "" when this
  checkout has no such commit (a shallow clone)."""
  if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{ref}^{{commit}}"],
                    capture_output=True).returncode:
    return ""
  if os.path.isdir(directory):
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", directory],
                   capture_output=True)
  subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", directory, ref],
                 check=True, capture_output=True)
  return directory


def ratio(a, b):
  return round(a / b, 3) if a and b else None


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scales", default="1,5,20")
  p.add_argument("--in-memory-scales", default="1,5,20",
                 help="scales at which the in-memory prepare is measured too")
  p.add_argument("--in-memory-ref", default=IN_MEMORY_REF,
                 help="git commit of the in-memory prepare (run from a worktree of it)")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "prepare_scale"))
  p.add_argument("--pipeline-batches", type=int, default=50)
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
  p.add_argument("--keep", action="store_true", help="keep the worlds and outputs")
  p.add_argument("--object-store-gb", type=float, default=None,
                 help="the object store of prepare's private Ray (default: the config's "
                      "data.ray_object_store_gb; 0: Ray's default, 30%% of RAM); beyond it Ray "
                      "spills blocks to disk")
  # The child side (internal).
  p.add_argument("--child", choices=sorted(CHILDREN))
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--raw", default="")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(CHILDREN[args.child](args)), flush=True)
    return {}
  from benchmarks.machine import cpu_summary
  try:
    scales = [float(s) for s in args.scales.split(",") if s]
    args.in_memory_scales = {float(s) for s in args.in_memory_scales.split(",") if s}
  except ValueError as error:
    p.error(f"--scales / --in-memory-scales: {error}")
  if not scales or min(scales) <= 0:
    p.error("--scales must be positive numbers")
  log = lambda s: print(s, flush=True)
  t0 = time.time()
  args.in_memory_root = ""
  if args.in_memory_scales:
    args.in_memory_root = in_memory_checkout(args.in_memory_ref,
                                             os.path.join(args.workdir, "in_memory_checkout"))
    if not args.in_memory_root:
      log(f"commit {args.in_memory_ref} not found: the in-memory prepare is not measured")
  try:
    rows = {f"{s:g}": run_scale(s, args, log) for s in scales}
  finally:
    if args.in_memory_root:
      subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", args.in_memory_root],
                     capture_output=True)
  print("\n| scale | log rows | prepare s | prepare rows/s | rows/s without examples | "
        "prepare peak GB | pipeline peak GB | in-memory rows/s | in-memory peak GB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    mem = r.get("in_memory", {})
    print(f"| {name}x | {r['log_rows']:,} | {r.get('prepare_seconds', '-')} | "
          f"{r.get('rows_per_s', r.get('error', '-'))} | "
          f"{r.get('rows_per_s_without_examples', '-')} | {r['prepare_peak_gb']} | "
          f"{r.get('pipeline_peak_gb', '-')} | {mem.get('rows_per_s', mem.get('error', '-'))} | "
          f"{mem.get('prepare_peak_gb', '-')} |")
  first, last = rows[f"{scales[0]:g}"], rows[f"{scales[-1]:g}"]
  out = {"prepare_scale": {
      "scale": rows,
      "peak_growth": {"prepare": ratio(last["prepare_peak_gb"], first["prepare_peak_gb"]),
                      "pipeline": ratio(last.get("pipeline_peak_gb"),
                                        first.get("pipeline_peak_gb")),
                      "from": f"{scales[0]:g}x", "to": f"{scales[-1]:g}x"},
      "slowdown_vs_in_memory": ratio(first.get("in_memory", {}).get("rows_per_s"),
                                     first.get("rows_per_s_without_examples")),
      "slowdown_vs_in_memory_with_examples": ratio(first.get("in_memory", {}).get("rows_per_s"),
                                                   first.get("rows_per_s")),
      "in_memory_ref": args.in_memory_ref if args.in_memory_root else None,
      "object_store_gb": (scaled_config(1).data.ray_object_store_gb
                          if args.object_store_gb is None else args.object_store_gb),
      "cpu": cpu_summary(), "seconds": round(time.time() - t0, 1)}}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
