"""Two-tower training throughput of omnisage (JAX, Flax NNX, optax) and TFRS, side by side.

Both sides train the same model on the same data with the same batch, in one run of this script:
  tower(id)  = L2norm(Dense(dim)(relu(Dense(hidden)(Embedding(buckets, dim)(bucket(id))))))
             one tower for users, one for items; bucket() is the multiplicative hash of
             benchmarks/peers/twotower_data.py, the same integer function on both sides
  loss       in-batch softmax over the batch: row i's logits are cos(u_i, v_j) / temperature, target
             j = i, columns with the same item id as the row's positive removed (accidental hits),
             mean cross-entropy over rows; no logQ correction on either side
  optimiser  Adam(lr), beta (0.9, 0.999), eps 1e-7 (Keras's default; optax's is 1e-8)
  init       Keras defaults on both: Embedding uniform(-0.05, 0.05), Dense glorot-uniform, bias 0
  data       Zipf users and Zipf items of the user's taste (twotower_data.make_pairs), generated
             once, saved as .npy, read by both sides; the same batches in the same order

  omnisage   this process: an NNX model split into a graph and an optax state, one jax.jit step
             with donated parameters and optimiser state; every step slices the host NumPy arrays
             and device_puts the batch (host -> device in the timing). Two variants, each run:
             "omnisage" (the headline): the batch's distinct users and items are found on the host
             (`omnisage.train.dedup_softmax.dedup_rows`, inside the timing), each tower runs once
             per distinct id and the loss is `dedup_inbatch_softmax_loss` over the [users, items]
             logits: the same loss and gradients as the [B, B] form, exactly (Zipf data: ~2,400
             distinct users and ~3,400 distinct items per 6,000 pairs);
             "omnisage_rows": the [B, B] form, `omnisage.train.losses.sampled_softmax_loss` (no
             random negatives, use_logq=False, a fixed temperature: its clip is set to the
             temperature, so it is not learned), one tower row per pair, as TFRS does.
  TFRS       a child process in .venv-peers (TF 2.20, tf-keras, tensorflow-recommenders 0.7.7,
             TF_USE_LEGACY_KERAS=1): tfrs.Model + tfrs.tasks.Retrieval(temperature,
             remove_accidental_hits=True, mean cross-entropy) trained by Keras model.fit on
             tf.data (from_tensor_slices -> batch -> prefetch); see benchmarks/peers/tfrs_side.py.
             Run twice per round: the default graph mode and compile(jit_compile=True) (XLA), so the
             peer gets its best setting; the ratio is against the faster of the two.
Where the losses differ: TFRS's Retrieval masks accidental hits with the float32 minimum, omnisage
with -1e30 (both underflow to 0); in omnisage rows with the same query id are also not each other's
negatives, which is void here (query ids are the row numbers). Keras adds eps to sqrt(v) before the
bias correction, optax after it (eps only matters for tiny gradients).

Host memory: with --host-malloc reuse (the default) both sides run with the same glibc malloc
settings, omnisage.train.host_memory.reuse_freed_host_memory() (what `launch.py` does), set before
either framework starts its threads: freed step temporaries stay in the process instead of being
unmapped and page-faulted in again every step. --host-malloc default runs both sides with glibc's
defaults.

Threads: this process pins itself to the first --threads cores (os.sched_setaffinity) before JAX
starts, so XLA's CPU thread pool has that many threads; the TF child inherits the affinity and gets
intra_op = inter_op = --threads. The sides run alternately (omnisage, TFRS, TFRS+XLA, then
again), so they see the same machine load. Throughput is examples (pairs) per second over --steps
steps after --warmup steps (compilation/tracing), best of --rounds rounds (medians in the JSON).
Every side starts from a fresh initialisation each round; the loss curves of round 1 are compared so
that a broken side is caught.

Usage:
  .venv/bin/python benchmarks/vs_tfrs.py [--batches 4096,6000] [--steps 10] [--rounds 2]
                                         [--no-rows] [--no-jit-peer]
  needs `make peers` (.venv-peers); --peers-python points elsewhere. Default sizes take 8 to 14
  minutes on this project's 2-core CPU machine (most of it TensorFlow start-up and tracing).
Prints a table and ends with one JSON line {"vs_tfrs": {...}}.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.machine import cpu_summary
from benchmarks.peers.twotower_data import HASH_MULTIPLIER, make_pairs, save_pairs
from omnisage.models.compat import l2_normalize
from omnisage.train.dedup_softmax import dedup_inbatch_softmax_loss, dedup_rows
from omnisage.train.host_memory import reuse_freed_host_memory
from omnisage.train.losses import sampled_softmax_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPT = os.path.join(ROOT, "benchmarks", "peers", "tfrs_side.py")
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
KERAS_EMBED_INIT = 0.05    # Keras Embedding's default RandomUniform(-0.05, 0.05)
ADAM_EPS = 1e-7            # Keras Adam's default epsilon


def hash_buckets(ids: jax.Array, buckets: int) -> jax.Array:
  """twotower_data's hash in uint32: the multiplication wraps mod 2^32 by itself."""
  return (ids.astype(jnp.uint32) * jnp.uint32(HASH_MULTIPLIER) % jnp.uint32(buckets)).astype(
    jnp.int32)


def keras_embed_init(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -KERAS_EMBED_INIT, KERAS_EMBED_INIT)


class HashTower(nnx.Module):
  """id -> bucket -> Embed(buckets, dim) -> Linear(hidden) relu -> Linear(dim) -> L2 norm."""

  def __init__(self, buckets: int, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.buckets = buckets
    self.embed = nnx.Embed(buckets, dim, embedding_init=keras_embed_init, rngs=rngs)
    glorot = nnx.initializers.glorot_uniform()
    self.hidden = nnx.Linear(dim, hidden, kernel_init=glorot, rngs=rngs)
    self.out = nnx.Linear(hidden, dim, kernel_init=glorot, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.embed(hash_buckets(ids, self.buckets))
    return l2_normalize(self.out(jax.nn.relu(self.hidden(x))))


class JaxTwoTower(nnx.Module):
  def __init__(self, buckets: int, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.user_tower = HashTower(buckets, dim, hidden, rngs=rngs)
    self.item_tower = HashTower(buckets, dim, hidden, rngs=rngs)


def jax_loss(model: JaxTwoTower, users: jax.Array, items: jax.Array, temperature: float,
             **impl):
  """Mean in-batch softmax cross-entropy, same-item columns masked: TFRS Retrieval's loss.

  impl: optional `impl` / `block_size` of sampled_softmax_loss (its logsumexp primitive).
  """
  log_scale = math.log(1.0 / temperature)
  loss, _ = sampled_softmax_loss(
    model.user_tower(users), model.item_tower(items), log_temperature=jnp.float32(log_scale),
    temperature_max=log_scale, query_ids=jnp.arange(users.shape[0]), pos_ids=items,
    pos_log_q=jnp.zeros(users.shape, jnp.float32), use_logq=False, **impl)
  return loss


def jax_dedup_loss(model: JaxTwoTower, users: jax.Array, items: jax.Array, row_user: jax.Array,
                   row_item: jax.Array, item_count: jax.Array, temperature: float):
  """`jax_loss` from the batch's distinct users and items (`omnisage.train.dedup_softmax`).

  users, items: the distinct ids (padded); row_user, row_item: each pair's index into them.
  """
  return dedup_inbatch_softmax_loss(
    model.user_tower(users), model.item_tower(items), scale=jnp.float32(1.0 / temperature),
    col_bias=jnp.zeros(items.shape, jnp.float32), row_query=row_user, row_cand=row_item,
    cand_count=item_count)


def make_train_step(graphdef, optimizer, temperature: float, *, dedup: bool = False, **impl):
  """jit(params, opt_state, *batch) -> (params, opt_state, loss), state buffers donated.

  batch: (users, items) of the pairs, or with dedup `jax_dedup_loss`'s arrays (from `dedup_rows`).
  """

  def step(params, opt_state, *batch):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      if dedup:
        return jax_dedup_loss(model, *batch, temperature)
      return jax_loss(model, *batch, temperature, **impl)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run_jax(users: np.ndarray, items: np.ndarray, args, batch: int, *, dedup: bool,
            seed: int = 0) -> dict:
  """Fresh model, args.warmup + args.steps steps over the leading pairs; same keys as tfrs_side.

  With dedup the distinct ids are found on the host inside the timed loop; the step compiles once
  per padded (users, items) shape, and compilations after the warm-up are timed too (counted in
  `shapes`).
  """
  model = JaxTwoTower(args.buckets, args.dim, args.hidden, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adam(args.lr, eps=ADAM_EPS)
  opt_state = optimizer.init(params)
  impl = {} if args.loss_impl == "dense" else {"impl": args.loss_impl,
                                               "block_size": args.block_size}
  step = make_train_step(graphdef, optimizer, args.temperature, dedup=dedup, **impl)
  losses, shapes, distinct, t0 = [], set(), [], time.perf_counter()
  for i in range(args.warmup + args.steps):
    if i == args.warmup:
      jax.block_until_ready(params)
      t_start = time.perf_counter()
    rows = slice(i * batch, (i + 1) * batch)
    if dedup:   # host side: distinct users and items (padded), each pair's indices
      d = dedup_rows(users[rows], items[rows], pad_multiple=args.pad_multiple)
      host = (d.query_keys, d.cand_keys, d.row_query, d.row_cand, d.cand_count)
      shapes.add((len(d.query_keys), len(d.cand_keys)))
      distinct.append((d.num_queries, d.num_cands))
    else:
      host = (users[rows], items[rows])
    params, opt_state, loss = step(params, opt_state, *map(jax.device_put, host))
    losses.append(loss)
  jax.block_until_ready(params)
  measured_s = time.perf_counter() - t_start
  out = {"side": "omnisage" if dedup else "omnisage_rows",
         "examples_per_s": args.steps * batch / measured_s,
         "step_ms": 1000 * measured_s / args.steps, "warmup_s": t_start - t0,
         "losses": [float(x) for x in losses]}
  if dedup:
    out.update(shapes=sorted(shapes),
               mean_distinct_users=float(np.mean([g for g, _ in distinct])),
               mean_distinct_items=float(np.mean([u for _, u in distinct])))
  return out


def run_tfrs(data_dir: str, args, batch: int, *, jit_compile: bool) -> dict:
  """tfrs_side.py in the peers interpreter; its closing JSON line."""
  cmd = [args.peers_python, PEER_SCRIPT, f"--data={data_dir}", f"--batch={batch}",
         f"--steps={args.steps}", f"--warmup={args.warmup}", f"--buckets={args.buckets}",
         f"--dim={args.dim}", f"--hidden={args.hidden}", f"--temperature={args.temperature}",
         f"--lr={args.lr}", f"--threads={args.threads}", f"--seed={args.seed}",
         f"--host-malloc={args.host_malloc}"]
  cmd += ["--jit-compile"] if jit_compile else []
  # PYTHONPATH: the repo root, so that tfrs_side.py can import omnisage.train.host_memory (for
  # --host-malloc=reuse) although the peers virtualenv does not install omnisage.
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def learning_check(curves: dict[str, list[float]], tail: int = 3) -> dict:
  """First loss, mean of the last `tail` losses, and whether every side learnt comparably.

  ok: every side's final loss is below 90% of its first, and within 15% of omnisage's.
  """
  summary = {name: {"first": c[0], "final": float(np.mean(c[-tail:]))}
             for name, c in curves.items()}
  ref = summary["omnisage"]["final"]
  ok = all(s["final"] < 0.9 * s["first"] and abs(s["final"] - ref) <= 0.15 * ref
           for s in summary.values())
  return {"ok": bool(ok), **summary}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="4096,6000", help="comma-separated batch sizes")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--buckets", type=int, default=100_000, help="hash buckets per tower")
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.05)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--loss-impl", default="dense",
                      help="sampled_softmax_loss impl (omnisage.train.losses.LSE_IMPLS)")
  parser.add_argument("--block-size", type=int, default=512, help="columns per block (blockwise)")
  parser.add_argument("--pad-multiple", type=int, default=256,
                      help="distinct users/items padded to a multiple of this (dedup step shapes)")
  parser.add_argument("--no-rows", action="store_true",
                      help="skip omnisage's [B, B] step (the side without deduplication)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-jit-peer", action="store_true", help="skip TFRS with jit_compile")
  parser.add_argument("--peers-python", default=PEERS_PYTHON)
  parser.add_argument("--host-malloc", choices=["reuse", "default"], default="reuse",
                      help="glibc malloc settings for both sides (see the module docstring)")
  args = parser.parse_args()
  if args.warmup < 1 or args.steps < 1:
    sys.exit("error: --warmup and --steps must be >= 1")
  if not os.path.exists(args.peers_python):
    sys.exit(f"error: {args.peers_python} not found: run `make peers` first")
  # Before JAX creates its CPU client, so XLA sizes its thread pool to these cores.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  if args.host_malloc == "reuse" and not reuse_freed_host_memory():
    sys.exit("error: --host-malloc reuse needs glibc's mallopt; pass --host-malloc default")
  batches = [int(b) for b in args.batches.split(",")]
  peers = ["tfrs"] + ([] if args.no_jit_peer else ["tfrs_jit"])
  mine = ["omnisage"] + ([] if args.no_rows else ["omnisage_rows"])

  results = {}
  with tempfile.TemporaryDirectory(prefix="vs_tfrs_") as data_dir:
    users, items = make_pairs(num_pairs=(args.warmup + args.steps) * max(batches), seed=args.seed)
    save_pairs(data_dir, users, items)
    print(f"{'batch':>6} {'round':>5} {'side':<13} {'examples/s':>11} {'step ms':>8} "
          f"{'warm-up s':>9} {'loss first':>10} {'loss last':>9}", flush=True)
    for batch in batches:
      runs = {name: [] for name in mine + peers}
      for r in range(args.rounds):
        for name in runs:   # alternate: every side sees the same machine load
          if name in mine:
            out = run_jax(users, items, args, batch, dedup=name == "omnisage", seed=args.seed)
          else:
            out = run_tfrs(data_dir, args, batch, jit_compile=name == "tfrs_jit")
          runs[name].append(out)
          print(f"{batch:>6} {r + 1:>5} {name:<13} {out['examples_per_s']:>11.0f} "
                f"{out['step_ms']:>8.1f} {out['warmup_s']:>9.1f} {out['losses'][0]:>10.3f} "
                f"{out['losses'][-1]:>9.3f}", flush=True)
      # Best of the rounds: the machine is shared, and interference only ever slows a run down.
      rate = {name: max(o["examples_per_s"] for o in outs) for name, outs in runs.items()}
      median = {name: round(statistics.median(o["examples_per_s"] for o in outs))
                for name, outs in runs.items()}
      best_peer = max(peers, key=rate.get)
      results[batch] = {
        "omnisage_examples_per_s": round(rate["omnisage"]),
        "tfrs_examples_per_s": round(rate[best_peer]),
        "tfrs_setting": best_peer,
        "ratio": round(rate["omnisage"] / rate[best_peer], 2),
        "ratio_without_dedup": (round(rate["omnisage_rows"] / rate[best_peer], 2)
                                if "omnisage_rows" in rate else None),
        "distinct_users_items_per_batch": [runs["omnisage"][0]["mean_distinct_users"],
                                           runs["omnisage"][0]["mean_distinct_items"]],
        "dedup_shapes": runs["omnisage"][0]["shapes"],
        "per_side_examples_per_s": {name: round(v) for name, v in rate.items()},
        "per_side_median_examples_per_s": median,
        "learning": learning_check({name: outs[0]["losses"] for name, outs in runs.items()}),
        "peer_versions": runs["tfrs"][0]["versions"],
      }

  print()
  print(f"{'batch':>6} {'omnisage ex/s':>14} {'rows ex/s':>10} {'TFRS ex/s':>10} "
        f"{'TFRS+XLA ex/s':>14} {'ratio':>6} {'rows ratio':>10} {'learning ok':>11}")
  for batch, res in results.items():
    per = res["per_side_examples_per_s"]
    print(f"{batch:>6} {per['omnisage']:>14} {per.get('omnisage_rows', '-'):>10} "
          f"{per['tfrs']:>10} {per.get('tfrs_jit', '-'):>14} {res['ratio']:>6} "
          f"{str(res['ratio_without_dedup']):>10} {str(res['learning']['ok']):>11}")
  head = results[batches[-1]]
  print(json.dumps({"vs_tfrs": {
    "omnisage_examples_per_s": head["omnisage_examples_per_s"],
    "tfrs_examples_per_s": head["tfrs_examples_per_s"], "ratio": head["ratio"],
    "ratio_without_dedup": head["ratio_without_dedup"],
    "batch": batches[-1], "tfrs_setting": head["tfrs_setting"],
    "by_batch": {str(b): r for b, r in results.items()},
    "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
    "buckets": args.buckets, "dim": args.dim, "hidden": args.hidden,
    "temperature": args.temperature, "lr": args.lr, "loss_impl": args.loss_impl,
    "pad_multiple": args.pad_multiple,
    "host_malloc": args.host_malloc,
    "jax": jax.__version__,
    "backend": jax.default_backend(), "cpu": cpu_summary()}}))


if __name__ == "__main__":
  main()
