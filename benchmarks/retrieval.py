"""Retrieval benchmark: exact vs ScaNN search, Recall@10 and queries/second (SPEC §1 "Serving").

Production retrieves with an approximate index (HNSW there, ScaNN here); this measures what the
approximation costs and buys, side by side with exact search, in one run per dataset:

- exact NumPy: query blocks of 512 x database chunks of 256k rows, BLAS matmul + argpartition;
- exact JAX: jitted matmul + `lax.top_k` over 32k-row chunks (`omnisage.serving.index.ann`); its
  results are the ground truth for every recall here;
- ScaNN (tree + AH, dims_per_block 2, + float reorder): a few fixed configs on the 2 x sqrt(N)
  leaf tree, and the config `ann.autotune` picks for Recall@10 >= 0.95 on separate tuning queries.

Datasets: (a) the demo pin embeddings searched with the demo query embeddings (when
`embeddings_dir` is given); (b) `synthetic_rows` x `dim` clustered synthetic embeddings
(`benchmarks.synthetic_embeddings`) with queries from the same process. All methods use the
machine's cores (NumPy's BLAS, XLA and ScaNN each `threads`); QPS is batched throughput after a
warm-up. Output: a printed table, `out_dir/retrieval.json` and `out_dir/retrieval.png` (recall vs
QPS, log x).

Usage: `summary = run_retrieval_bench("runs/demo/embeddings", "runs/demo/bench")`
(`launch.py bench retrieval --embeddings=... --out=...`; `--bench_size=0` skips the synthetic set).
"""

import importlib.metadata
import json
import logging
import math
import os
import time

import jax
import numpy as np

from benchmarks.synthetic_embeddings import clustered_embeddings
from omnisage.serving.index import ann
from omnisage.serving.index.scann_index import read_embeddings

log = logging.getLogger("omnisage")

# ScaNN configs measured besides the tuned one: (fraction of leaves searched, reorder size).
FIXED_CONFIGS = ((0.005, 100), (0.005, 200), (0.01, 200), (0.02, 200), (0.05, 300), (0.1, 300))
TARGET_SPEEDUP = 20.0


def numpy_topk(queries: np.ndarray, database: np.ndarray, k: int, query_block: int = 512,
               chunk_rows: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k with NumPy: blocked BLAS matmul + argpartition; (scores, rows) best first."""
  scores_out = np.empty((len(queries), k), np.float32)
  rows_out = np.empty((len(queries), k), np.int64)
  for start in range(0, len(queries), query_block):
    block = queries[start:start + query_block]
    best_s = np.full((len(block), 0), -np.inf, np.float32)
    best_r = np.zeros((len(block), 0), np.int64)
    for offset in range(0, len(database), chunk_rows):
      scores = block @ database[offset:offset + chunk_rows].T
      kk = min(k, scores.shape[1])
      top = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]
      best_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
      best_r = np.concatenate([best_r, top + offset], axis=1)
      if best_s.shape[1] > k:
        keep = np.argpartition(best_s, best_s.shape[1] - k, axis=1)[:, -k:]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_r = np.take_along_axis(best_r, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    scores_out[start:start + len(block)] = np.take_along_axis(best_s, order, axis=1)
    rows_out[start:start + len(block)] = np.take_along_axis(best_r, order, axis=1)
  return scores_out, rows_out


def _timed(search, queries, warmup, min_seconds):
  """(result of one pass over queries, QPS): warm-up on a small block, then >= min_seconds."""
  search(warmup)
  passes, result, t0 = 0, None, time.perf_counter()
  while True:
    result = search(queries)
    passes += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= min_seconds:
      return result, passes * len(queries) / elapsed


def bench_dataset(name: str, database: np.ndarray, queries: np.ndarray, tune: np.ndarray,
                  holdout: np.ndarray, k: int = 10, target_recall: float = 0.95,
                  threads: int | None = None, qps_seconds: float = 2.0) -> dict:
  """All methods on one database; `queries` are the evaluation queries (not used to tune)."""
  threads = threads or os.cpu_count() or 1
  n, dim = database.shape
  log.info("bench %s: %d x %d, %d queries", name, n, dim, len(queries))
  rows = []
  exact = ann.ExactSearcher(database)
  warm = queries[:exact.query_block]
  (truth, _), jax_qps = _timed(lambda q: exact.search(q, k), queries, warm, qps_seconds)
  rows.append({"method": "exact_jax", "params": {"query_block": exact.query_block,
                                                 "chunk_rows": exact.chunk_rows},
               "recall@10": 1.0, "qps": jax_qps})
  (_, np_rows), np_qps = _timed(lambda q: numpy_topk(q, database, k), queries, warm[:512],
                                qps_seconds)
  rows.append({"method": "exact_numpy", "params": {"query_block": 512, "chunk_rows": 262_144},
               "recall@10": ann.recall_at_k(queries, database, np_rows, truth), "qps": np_qps})
  best_exact = max(rows, key=lambda r: r["qps"])

  t0 = time.time()
  tuned = ann.autotune(database, tune, holdout, target_recall=target_recall, k=k,
                       threads=threads, exact=exact, keep_searchers=True)
  tune_seconds = time.time() - t0
  searchers = tuned["searchers"] or {None: tuned["searcher"]}
  configs = [("scann_autotuned", tuned["searcher"], tuned["params"])]
  if tuned["params"]["algorithm"] == "tree_ah":
    # Fixed configs on the tree nearest 2 x sqrt(N) leaves (the usual rule of thumb).
    leaves = min(searchers, key=lambda size: abs(size - 2 * math.sqrt(n)))
    for fraction, reorder in FIXED_CONFIGS:
      params = {"algorithm": "tree_ah", "num_leaves": leaves,
                "leaves_to_search": max(1, round(fraction * leaves)), "reorder": min(n, reorder)}
      configs.append(("scann_fixed", searchers[leaves], params))
  for method, searcher, params in configs:
    def search(q, searcher=searcher, params=params):
      return ann.scann_search(searcher, q, k, params["leaves_to_search"], params["reorder"],
                              threads)
    (_, found), qps = _timed(search, queries, warm, qps_seconds)
    rows.append({"method": method, "params": params,
                 "recall@10": ann.recall_at_k(queries, database, found, truth), "qps": qps})
  for row in rows:
    row["speedup"] = row["qps"] / best_exact["qps"]
  meeting = [r for r in rows if r["method"].startswith("scann") and r["recall@10"] >= 0.95]
  best = max(meeting, key=lambda r: r["qps"]) if meeting else None
  return {
      "rows": n, "dim": dim, "queries": len(queries), "tune_queries": len(tune),
      "holdout_queries": len(holdout), "threads": threads,
      "exact_numpy_qps": np_qps, "exact_jax_qps": jax_qps,
      "numpy_recall_vs_jax": rows[1]["recall@10"],
      "best_exact": {"method": best_exact["method"], "qps": best_exact["qps"]},
      "best_scann_recall_0.95": None if best is None else {
          "params": best["params"], "method": best["method"], "recall@10": best["recall@10"],
          "qps": best["qps"], "speedup": best["speedup"]},
      "target": {"recall@10": 0.95, "speedup": TARGET_SPEEDUP,
                 "met": best is not None and best["speedup"] >= TARGET_SPEEDUP},
      "autotune": {"params": tuned["params"], "tune": tuned["tune"],
                   "holdout": tuned["holdout"], "met_target": tuned["met_target"],
                   "build_seconds": tuned["build_seconds"],
                   "tune_seconds": round(tune_seconds, 1), "trials": tuned["trials"]},
      "results": rows}


def demo_dataset(embeddings_dir: str, num_queries: int, tune_per_split: int, seed: int):
  """(database, eval queries, tune, holdout): demo pins searched with demo query embeddings."""
  pins_dir = os.path.join(embeddings_dir, "pins")
  if not os.path.isdir(pins_dir):
    raise FileNotFoundError(f"{pins_dir}: no pin embeddings (launch.py embed)")
  database = read_embeddings(pins_dir).vectors
  queries_dir = os.path.join(embeddings_dir, "queries")
  if not os.path.isdir(queries_dir):
    raise FileNotFoundError(f"{queries_dir}: no query embeddings to search the pins with")
  queries = read_embeddings(queries_dir).vectors
  if queries.shape[1] != database.shape[1]:
    raise ValueError(f"{queries_dir}: dim {queries.shape[1]} disagrees with pins "
                     f"({database.shape[1]})")
  queries = queries[np.random.default_rng(seed).permutation(len(queries))]
  # Tuning splits come first and are never evaluation queries.
  split = min(tune_per_split, len(queries) // 4)
  tune, holdout = queries[:split], queries[split:2 * split]
  return database, queries[2 * split:2 * split + num_queries], tune, holdout


def run_retrieval_bench(embeddings_dir: str | None, out_dir: str,
                        synthetic_rows: int = 1_000_000, dim: int = 256, k: int = 10,
                        num_queries: int = 2000, seed: int = 0, target_recall: float = 0.95,
                        tune_per_split: int = 1000, qps_seconds: float = 2.0,
                        threads: int | None = None) -> dict:
  """Benchmarks every dataset; writes retrieval.json and retrieval.png; returns the summary."""
  if embeddings_dir is None and synthetic_rows <= 0:
    raise ValueError("nothing to benchmark: pass --embeddings and/or --bench_size > 0")
  if synthetic_rows < 0 or num_queries < 1 or k < 1:
    raise ValueError(f"need synthetic_rows >= 0, num_queries >= 1, k >= 1; got "
                     f"{synthetic_rows}, {num_queries}, {k}")
  threads = threads or os.cpu_count() or 1
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  load_before = os.getloadavg()
  datasets = {}
  if embeddings_dir is not None:
    database, queries, tune, holdout = demo_dataset(embeddings_dir, num_queries, tune_per_split,
                                                    seed)
    datasets["demo_pins"] = bench_dataset("demo_pins", database, queries, tune, holdout, k,
                                          target_recall, threads, qps_seconds)
  if synthetic_rows > 0:
    t1 = time.time()
    database, queries = clustered_embeddings(synthetic_rows, dim,
                                             num_queries + 2 * tune_per_split, seed)
    generate_seconds = time.time() - t1
    tune = queries[num_queries:num_queries + tune_per_split]
    holdout = queries[num_queries + tune_per_split:]
    name = f"synthetic_{synthetic_rows}"
    datasets[name] = bench_dataset(name, database, queries[:num_queries], tune, holdout, k,
                                   target_recall, threads, qps_seconds)
    datasets[name]["generate_seconds"] = round(generate_seconds, 1)
    del database
  summary = {"threads": threads, "cpu_count": os.cpu_count(), "k": k,
             "loadavg_before": [round(x, 2) for x in load_before],
             "loadavg_after": [round(x, 2) for x in os.getloadavg()],
             "versions": {"jax": jax.__version__, "numpy": np.__version__,
                          "scann": importlib.metadata.version("scann")},
             "seconds": round(time.time() - t0, 1), "datasets": datasets}
  print(format_table(summary))
  json_path = os.path.join(out_dir, "retrieval.json")
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=2, default=float)
  png_path = os.path.join(out_dir, "retrieval.png")
  plot(summary, png_path)
  return {"json": json_path, "png": png_path, "threads": threads,
          "seconds": summary["seconds"],
          "datasets": {name: {key: d[key] for key in (
              "rows", "exact_numpy_qps", "exact_jax_qps", "best_exact",
              "best_scann_recall_0.95", "target")} for name, d in datasets.items()}}


def _describe(params: dict) -> str:
  if params.get("algorithm") == "tree_ah":
    return (f"leaves {params['leaves_to_search']}/{params['num_leaves']} "
            f"reorder {params['reorder']}")
  if params.get("algorithm") == "brute_force":
    return "brute force"
  return " ".join(f"{key} {value}" for key, value in params.items())


def format_table(summary: dict) -> str:
  lines = [f"retrieval benchmark (k={summary['k']}, threads={summary['threads']}, "
           f"loadavg {summary['loadavg_before'][0]} -> {summary['loadavg_after'][0]})"]
  for name, d in summary["datasets"].items():
    lines.append(f"\n{name}: {d['rows']} x {d['dim']}, {d['queries']} eval queries "
                 f"(+{d['tune_queries']} tune, +{d['holdout_queries']} held-out)")
    lines.append(f"  {'method':<16} {'params':<36} {'recall@10':>9} {'QPS':>10} {'speedup':>8}")
    for row in d["results"]:
      lines.append(f"  {row['method']:<16} {_describe(row['params']):<36} "
                   f"{row['recall@10']:>9.4f} {row['qps']:>10.1f} {row['speedup']:>7.1f}x")
    best = d["best_scann_recall_0.95"]
    verdict = "no ScaNN config reached recall 0.95" if best is None else (
        f"best ScaNN at recall >= 0.95: {_describe(best['params'])}, recall "
        f"{best['recall@10']:.4f}, {best['qps']:.0f} QPS = {best['speedup']:.1f}x the best exact "
        f"({d['best_exact']['method']}, {d['best_exact']['qps']:.1f} QPS)")
    lines.append(f"  {verdict}; target {TARGET_SPEEDUP:.0f}x: "
                 f"{'met' if d['target']['met'] else 'NOT met'}")
    builds = ", ".join(f"{leaves} leaves {s:.0f}s"
                       for leaves, s in d["autotune"]["build_seconds"].items())
    lines.append(f"  trees built: {builds or 'none (brute force)'}; autotune total "
                 f"{d['autotune']['tune_seconds']:.0f}s")
  return "\n".join(lines)


def plot(summary: dict, path: str):
  """Recall@10 vs QPS (log x) per dataset: exact baselines, ScaNN configs, the target point."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  names = list(summary["datasets"])
  fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
  styles = {"exact_jax": ("s", "tab:blue"), "exact_numpy": ("D", "tab:cyan"),
            "scann_fixed": ("o", "tab:orange"), "scann_autotuned": ("*", "tab:red")}
  for ax, name in zip(axes[0], names):
    d = summary["datasets"][name]
    for method, (marker, color) in styles.items():
      points = [r for r in d["results"] if r["method"] == method]
      if points:
        ax.scatter([r["qps"] for r in points], [r["recall@10"] for r in points],
                   marker=marker, color=color, s=140 if marker == "*" else 50, label=method,
                   zorder=3)
    exact_qps = d["best_exact"]["qps"]
    ax.axvline(exact_qps, color="gray", linestyle="--", label=f"best exact ({exact_qps:.0f} QPS)")
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
    ax.scatter([TARGET_SPEEDUP * exact_qps], [0.95], marker="x", color="black", s=80, zorder=4,
               label=f"target: recall 0.95 at {TARGET_SPEEDUP:.0f}x")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no overlapping labels
    ax.set_xlabel(f"queries / second ({summary['threads']} threads, batched)")
    ax.set_ylabel("Recall@10 vs exact")
    ax.set_title(f"{name}: {d['rows']:,} x {d['dim']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
