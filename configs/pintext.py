"""PinText (SPEC §2): one word dictionary trained on several engagement tasks with a hinge loss.

Variants (`configs/pintext.py:<arg>`):
  multitask (default)  homedepot + bestbuy + movielens, the multitask objective = sum over tasks
  homedepot | bestbuy | movielens   one task alone (the single-task models of the comparison)
  tiny                 the synthetic topic world, sizes for tests (seconds on one core)

Usage:
  python launch.py prepare --config=configs/pintext.py --workdir=runs/pintext/multitask
  python launch.py train   --config=configs/pintext.py --workdir=runs/pintext/multitask
  python launch.py eval    --config=configs/pintext.py --workdir=runs/pintext/multitask
  python launch.py export  --config=configs/pintext.py --workdir=runs/pintext/multitask \
      --out=runs/pintext/multitask/bundle
  python benchmarks/pintext.py          # all variants + random + MiniLM on WANDS

mu, rho, gamma were chosen on the tasks' VALIDATION pairs (never on WANDS) with
`python benchmarks/pintext.py --tune` (validation Recall@10 of the positive among 100 random
catalogue items, averaged over tasks); see the comments at loss.* for the values and the why.
"""

import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("homedepot", "bestbuy", "movielens")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "multitask"
  if arg not in ("multitask", "tiny", *TASKS):
    raise ValueError(f"configs/pintext.py: unknown variant {arg!r} "
                     f"(multitask, tiny, {', '.join(TASKS)})")
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.system = "pintext"   # omnisage/systems.py: its prepare/train/evaluate/export
  c.variant = arg
  c.seed = 0             # init, shuffling and negative sampling
  # Tasks trained together; their objectives are summed (SPEC §2 "Multitask objective").
  c.tasks = TASKS if arg in ("multitask", "tiny") else (arg,)

  # --- prepare (omnisage/data/pintext/pairs.py) -------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.datasets = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))
  d.synthetic = tiny        # True: the tiny synthetic topic world instead of the datasets
  d.prepared_dir = ""       # empty: <workdir>/prepared
  d.min_count = 1           # words seen fewer times are out of vocabulary
  d.max_vocab = 200_000     # SPEC §1's unigram vocabulary size; the real data has ~45k words
  d.query_len = 8           # query words kept (WANDS/Home Depot queries: 2-4 words, max ~12)
  d.item_len = 16           # item words kept (Home Depot titles: median ~10 words; the tail cut)

  # --- model (omnisage/models/pintext.py) -------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.dim = 16 if tiny else 64    # word vector size
  m.init_scale = 0.1            # N(0, init_scale) initial word vectors (the "random" baseline)

  # --- loss (omnisage/train/margin_loss.py) -----------------------------------------------------
  s = c.loss = ml_collections.ConfigDict()
  # Chosen by `benchmarks/pintext.py --tune --steps 300` on the VALIDATION pairs (mean over tasks
  # of Recall@10 among 100 random catalogue items): mu 0.1 / 0.2 / 0.4 -> 0.471 / 0.484 / 0.499
  # (rho 5, gamma 1); rho 10 -> 0.486 at mu 0.2 for twice the step time, so rho stays 5; gamma 0
  # (no ball) gave exactly the gamma-1 result: with N(0, 0.1) init (row norm ~0.8) and Adagrad
  # steps the rows never reach norm 1 in these runs, so the radius is a guard, not active.
  # mu 0.4 is the grid's edge: larger margins are untested.
  s.margin = 0.4        # mu
  s.negatives = 5       # rho, random catalogue items per positive
  s.radius = 1.0        # gamma; word vectors are projected back into ||v|| <= gamma

  # --- training (omnisage/train/pintext/trainer.py) -----------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  # Pairs per task per step. Equal counts: each task weighs the same in the summed objective,
  # whatever its size (Home Depot has ~25k train pairs, Best Buy ~6.5k, MovieLens ~3.2k).
  t.batch_per_task = 32 if tiny else 128
  t.steps = 60 if tiny else 800     # ~4 epochs of Home Depot, ~34 of MovieLens (2-core budget)
  t.learning_rate = 0.1             # Adagrad (StarSpace's optimiser; sparse rows, no momentum)
  t.log_every = 20 if tiny else 250
  t.checkpoint_every = 20 if tiny else 1_000
  t.keep_checkpoints = 2
  t.async_checkpoint = True
  t.restart_if_corrupt = False   # True: when no checkpoint is intact, move them aside, start at 0
  t.nonfinite = "stop"           # a NaN/inf loss or gradient norm: "stop" the run, or "skip" it

  # --- evaluation ---------------------------------------------------------------------------
  e = c.eval = ml_collections.ConfigDict()
  e.val_candidates = 100   # random catalogue items each validation positive is ranked against
  # Run at the end of `train` and by `launch.py eval` (omnisage/train/evaluators/pintext.py).
  c.evals = ml_collections.ConfigDict({"pintext": {"type": "pintext"}})

  # --- device mesh (omnisage/train/sharding.py) -----------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1   # -1: all devices not used by `model`
  c.mesh.model = 1   # shards of the dictionary rows
  return c
