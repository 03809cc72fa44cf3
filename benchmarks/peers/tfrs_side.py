"""The TensorFlow Recommenders side of benchmarks/vs_tfrs.py: trains the two towers, prints JSON.

Runs in the peers virtualenv (`make peers` -> .venv-peers, TF 2.20 + tf-keras + TFRS 0.7.7) with
TF_USE_LEGACY_KERAS=1, as a child of benchmarks/vs_tfrs.py, which documents the architecture and
the loss (this file must mirror `vs_tfrs.JaxTwoTower` / `vs_tfrs.jax_loss`).

The standard TFRS path: a `tfrs.Model` whose `compute_loss` calls `tfrs.tasks.Retrieval` (in-batch
softmax, its default), trained by Keras `model.fit` on a `tf.data` pipeline (from_tensor_slices ->
batch -> prefetch). Steps are timed by a callback at the end of every batch; the first `--warmup`
steps (tracing, graph optimisation, XLA compilation) are excluded.

Usage (what vs_tfrs.py runs; PYTHONPATH is the repo root, for omnisage.train.host_memory, which the
peers virtualenv does not install):
  PYTHONPATH=. TF_USE_LEGACY_KERAS=1 .venv-peers/bin/python benchmarks/peers/tfrs_side.py \
      --data DIR --batch 4096 --steps 20 --warmup 3 [--jit-compile] --threads 2 \
      [--host-malloc=reuse]
Prints one JSON line: {"examples_per_s", "step_ms", "losses", ...}.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")   # tfrs 0.7.7 needs Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # CPU, like the JAX side

# --host-malloc reuse: the same glibc malloc settings as the JAX side, set before TensorFlow starts
# its thread pools (omnisage.train.host_memory is plain Python: no JAX needed; the repo root comes
# on PYTHONPATH from vs_tfrs.py).
if "--host-malloc=reuse" in sys.argv:
  from omnisage.train.host_memory import reuse_freed_host_memory
  if not reuse_freed_host_memory():
    sys.exit("error: --host-malloc=reuse needs glibc's mallopt")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
import tf_keras  # noqa: E402
from twotower_data import HASH_MULTIPLIER, load_pairs  # noqa: E402

keras = tf.keras  # tf_keras under TF_USE_LEGACY_KERAS=1


class HashTower(keras.Model):
  """id -> bucket (the shared hash) -> Embedding -> Dense relu -> Dense -> L2 norm."""

  def __init__(self, buckets: int, dim: int, hidden: int):
    super().__init__()
    self.buckets = buckets
    self.embed = keras.layers.Embedding(buckets, dim)   # default init uniform(-0.05, 0.05)
    self.hidden = keras.layers.Dense(hidden, activation="relu")
    self.out = keras.layers.Dense(dim)

  def call(self, ids):
    # int64 so id * multiplier (< 2^63) does not overflow; then mod 2^32 as uint32 arithmetic would.
    buckets = tf.math.floormod(tf.math.floormod(tf.cast(ids, tf.int64) * HASH_MULTIPLIER, 2**32),
                               self.buckets)
    x = self.out(self.hidden(self.embed(buckets)))
    return tf.math.l2_normalize(x, axis=-1)


class TwoTower(tfrs.Model):
  def __init__(self, args):
    super().__init__()
    self.user_tower = HashTower(args.buckets, args.dim, args.hidden)
    self.item_tower = HashTower(args.buckets, args.dim, args.hidden)
    # Mean (not TFRS's default sum) cross-entropy, so the loss reads like the JAX side's; Adam is
    # scale-invariant, so the updates are the same either way.
    self.task = tfrs.tasks.Retrieval(
      loss=keras.losses.CategoricalCrossentropy(from_logits=True),
      temperature=args.temperature, remove_accidental_hits=True)

  def compute_loss(self, features, training=False):
    users, items = features
    return self.task(self.user_tower(users), self.item_tower(items), candidate_ids=items,
                     compute_metrics=False)


class StepClock(keras.callbacks.Callback):
  """perf_counter() and the loss at the end of every training batch."""

  def __init__(self):
    super().__init__()
    self.times, self.losses = [], []

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time.perf_counter())
    self.losses.append(float(logs["loss"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="directory with users.npy and items.npy")
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--warmup", type=int, required=True)
  parser.add_argument("--buckets", type=int, required=True)
  parser.add_argument("--dim", type=int, required=True)
  parser.add_argument("--hidden", type=int, required=True)
  parser.add_argument("--temperature", type=float, required=True)
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, required=True)
  parser.add_argument("--jit-compile", action="store_true", help="compile(jit_compile=True): XLA")
  parser.add_argument("--host-malloc", choices=["reuse", "default"], default="default",
                      help="reuse: omnisage.train.host_memory's malloc settings (read at import)")
  args = parser.parse_args()

  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  keras.utils.set_random_seed(args.seed)
  users, items = load_pairs(args.data)
  total = args.warmup + args.steps
  if len(users) < total * args.batch:
    sys.exit(f"error: {args.data} holds {len(users)} pairs, {total * args.batch} needed")
  dataset = (tf.data.Dataset.from_tensor_slices((users[: total * args.batch],
                                                 items[: total * args.batch]))
             .batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  model = TwoTower(args)
  model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=args.jit_compile)
  clock = StepClock()
  t0 = time.perf_counter()
  model.fit(dataset, epochs=1, verbose=0, callbacks=[clock])
  measured_s = clock.times[-1] - clock.times[args.warmup - 1]
  print(json.dumps({
    "side": "tfrs" + ("_jit" if args.jit_compile else ""),
    "host_malloc": args.host_malloc,
    "examples_per_s": args.steps * args.batch / measured_s,
    "step_ms": 1000 * measured_s / args.steps,
    "warmup_s": clock.times[args.warmup - 1] - t0,
    "losses": clock.losses,
    "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                 "tensorflow_recommenders": tfrs.__version__, "numpy": np.__version__},
  }))


if __name__ == "__main__":
  main()
