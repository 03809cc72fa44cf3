"""The sentence-transformers side of benchmarks/vs_sentence_transformers.py (runs in .venv-peers).

Loads all-MiniLM-L6-v2 from a local directory (HF_HUB_OFFLINE: nothing is downloaded) with the
directory's own modules.json (Transformer -> mean Pooling -> Normalize), encodes the texts of a
JSON list on torch (CPU) with `--threads` intra-op threads under torch.inference_mode, and writes
the float32 embeddings to `--out` (.npy). Prints one JSON line: load_seconds (model loading, not
timed against encoding), seconds (each encode run, tokenisation included), batch_size, versions.

Usage:
  .venv-peers/bin/python benchmarks/peers/st_side.py --model DIR --texts texts.json --out st.npy \
      --threads 2 --batch-size 32 --repeats 1 [--workers 2]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_TF", "0")   # transformers would import the peers venv's TensorFlow

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--texts", required=True, help="JSON list of strings")
  p.add_argument("--out", required=True, help=".npy for the embeddings")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' default: 32")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--workers", type=int, default=1,
                 help=">1: sentence-transformers' multi-process pool of this many CPU workers, "
                      "each with threads / workers torch threads (its way to use several cores "
                      "as independent streams)")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  if args.workers > 1:
    # The pool's workers are spawned processes: they read their thread count from the environment.
    os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads // args.workers))
  import sentence_transformers
  import transformers
  from sentence_transformers import SentenceTransformer

  with open(args.texts, encoding="utf-8") as f:
    texts = json.load(f)
  t0 = time.perf_counter()
  model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
  # Worker start-up (spawning processes, loading the model in each) is loading, not encoding.
  pool = model.start_multi_process_pool(["cpu"] * args.workers) if args.workers > 1 else None
  load_seconds = time.perf_counter() - t0
  seconds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    with torch.inference_mode():
      # encode() sorts by length and pads each batch to its own longest text.
      emb = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                         normalize_embeddings=False, show_progress_bar=False, pool=pool)
    seconds.append(time.perf_counter() - t0)
  if pool is not None:
    model.stop_multi_process_pool(pool)
  np.save(args.out, emb.astype(np.float32))
  print(json.dumps(dict(load_seconds=load_seconds, seconds=seconds, batch_size=args.batch_size,
                        workers=args.workers,
                        threads=torch.get_num_threads(), modules=[type(m).__name__ for m in model],
                        max_seq_length=model.max_seq_length,
                        versions=dict(torch=torch.__version__,
                                      transformers=transformers.__version__,
                                      sentence_transformers=sentence_transformers.__version__))))


if __name__ == "__main__":
  main()
