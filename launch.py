"""omnisage's one entry point: flags, config, jax.distributed set-up, dispatch to the library.

  python launch.py prepare --config=configs/omnisage_synthetic.py --workdir=runs/demo
  python launch.py train   --config=configs/omnisage_synthetic.py --workdir=runs/demo
  python launch.py eval    --config=configs/omnisage_synthetic.py --workdir=runs/demo
  python launch.py demo    --config=configs/omnisage_synthetic.py --workdir=runs/demo
  python launch.py export  --config=configs/omnisage_synthetic.py --workdir=runs/demo \
      --out=runs/demo/bundle
  python launch.py embed   --bundle=runs/demo/bundle \
      --entities=runs/demo/prepared/entities/pins.parquet --out=runs/demo/embeddings
  python launch.py index   --embeddings=runs/demo/embeddings --out=runs/demo/index \
      --target-recall=0.95
  python launch.py bench retrieval --embeddings=runs/demo/embeddings --out=runs/demo/bench
  python launch.py serve   --bundle=runs/demo/bundle --index=runs/demo/index --port=8080

Config values are overridden with `--config.train.steps=100`; a config file takes an argument after
a colon (`configs/omnisage_synthetic.py:tiny`); embed, index, bench, serve and pinnersage need no
config. Flag names take '-' or '_' (`--target-recall` is `--target_recall`). Every subcommand ends
by printing ONE JSON line with its key figures.

Host memory: by default (--host_malloc=reuse) freed host memory stays in the process
(omnisage/train/host_memory.py: glibc mallopt), so XLA's CPU step temporaries are not unmapped and
page-faulted in again every step; --host_malloc=default keeps glibc's own settings.

Multi-host (one process per host, every process runs the same command line; tests/test_multihost.py
runs two processes on loopback and checks they train exactly like one process with all devices):
  - jax.distributed.initialize() joins the processes: either --coordinator_address=HOST:PORT
    (process 0's address, any free port) with --num_processes and --process_id, or
    --distributed=auto where the cluster tells JAX (SLURM, TPU VMs; Open MPI's env too).
  - The mesh spans every process's devices; `--config.mesh.data=-1` (the default) takes them all.
    Each process's Grain pipeline reads only its rows of each global batch, so batch sizes in the
    config are GLOBAL and must divide by the device count.
  - --workdir must be one shared filesystem path (NFS, Lustre, a gcsfuse or Filestore mount):
    every process writes its checkpoint shards there; only process 0 writes metrics, JSON and the
    final line. Run `prepare` once, on one host and without these flags, before `train`.
  - CPU-only processes talk through gloo collectives (set here before JAX starts its backend).

  # Multi-GPU hosts, e.g. 2 hosts with 8 GPUs each (run on both, process_id 0 and 1):
  python launch.py train --config=configs/omnisage_synthetic.py --workdir=/shared/run1 \
      --coordinator_address=host0:12345 --num_processes=2 --process_id=0
  # TPU VM slice (jax finds the workers itself):
  gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all --command="cd omnisage \
      && python launch.py train --config=configs/omnisage_synthetic.py --workdir=/mnt/shared/run1 \
      --distributed=auto"
  # SLURM, one task per node (jax reads SLURM_* for the coordinator, count and id):
  srun --nodes=2 --ntasks-per-node=1 --gpus-per-task=8 python launch.py train \
      --config=configs/omnisage_synthetic.py --workdir=/shared/run1 --distributed=auto
"""

import json
import logging
import os
import shutil
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = ("prepare", "train", "eval", "demo", "export", "embed", "index", "bench", "serve",
            "pinnersage", "compile")
# The commands that need --config and --workdir.
# embed reads everything from its --bundle (tokenizer, towers, dims), so it needs no config.
CONFIG_COMMANDS = ("prepare", "train", "eval", "demo", "export")
# Systems besides OmniSearchSage (SPEC §2-4): a config's `system` field names the module that
# implements its prepare/train/evaluate/export(config, workdir[, out]) -> dict.
SYSTEMS = {"twotower": "omnisage.train.twotower.trainer", "pintext": "omnisage.train.pintext.trainer"}
BENCHES = ("retrieval",)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (ml_collections).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for prepared data, checkpoints and logs.")
flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                  "auto: jax.distributed.initialize() detects the cluster.")
flags.DEFINE_enum("host_malloc", "reuse", ["reuse", "default"],
                  "reuse: keep freed host memory in the process (glibc mallopt, "
                  "omnisage.train.host_memory) so XLA's CPU step temporaries are not page-faulted "
                  "in again every step; default: glibc's own settings.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
flags.DEFINE_string("out", None, "export: directory to write the serving bundle to; embed: "
                    "directory to write <kind>/shard-*.parquet embeddings to.")
flags.DEFINE_string("bundle", None, "embed: the serving bundle directory (launch.py export).")
flags.DEFINE_string("entities", None, "embed: a prepared entity table (entities/pins.parquet).")
flags.DEFINE_integer("embed_batch_size", 1024, "embed: rows per tower call.")
flags.DEFINE_string("embeddings", None, "index, bench: directory of <kind>/shard-*.parquet "
                    "embeddings (launch.py embed).")
flags.DEFINE_float("target_recall", 0.95, "index: Recall@10 against exact search to tune for.")
flags.DEFINE_string("index", None, "serve: the index directory (launch.py index).")
flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (loopback by default).")
flags.DEFINE_integer("port", 8080, "serve: TCP port.")
flags.DEFINE_integer("max_batch", 64, "serve: queries per query-tower call (micro-batch cap).")
flags.DEFINE_float("max_wait_ms", 2.0, "serve: how long a query waits for a fuller batch.")
flags.DEFINE_integer("max_queue", 256, "serve: queries queued before requests get 503.")
flags.DEFINE_integer("cache_size", 100_000, "serve: query embeddings kept in the LRU cache.")
flags.DEFINE_float("cache_ttl_days", 30.0, "serve: cache time-to-live (SPEC: 30 days).")
flags.DEFINE_string("item_embeddings", None, "pinnersage: item embeddings (a directory of "
                    "<kind>/shard-*.parquet from `embed`, or one Parquet file with id, embedding).")
flags.DEFINE_string("actions", None, "pinnersage: Parquet of user actions (user_id, item_id, "
                    "timestamp in unix seconds).")
flags.DEFINE_float("alpha", None, "pinnersage: Ward cut height in embedding units (default: "
                   "omnisage.serving.pinnersage.service.DEFAULTS, tuned for unit-norm embeddings).")
flags.DEFINE_float("lambda_decay", 0.01, "pinnersage: importance decay per day, "
                   "exp(-lambda * age_days) (SPEC §4).")
flags.DEFINE_float("window_days", 90.0, "pinnersage: days of history clustered (SPEC §4).")
flags.DEFINE_integer("now", None, "pinnersage: unix seconds the window ends at (default: the "
                     "latest action).")
flags.DEFINE_string("item_kind", None, "pinnersage: kind directory of --item-embeddings "
                    "(default: its only non-query kind).")
flags.DEFINE_string("pinnersage", None, "serve (two-tower bundle): a `launch.py pinnersage` "
                    "output directory; adds /v1/pinnersage/update and /v1/pinnersage/recommend.")
flags.DEFINE_string("mesh", None, "compile: target mesh as DATAxMODEL, e.g. 8x1 (simulated "
                    "devices on CPU).")
flags.DEFINE_integer("bench_size", 1_000_000, "bench retrieval: rows of the clustered synthetic "
                     "database (0 skips it).")


class UserError(Exception):
  """A mistake in the command line, config or input files: reported without a stack trace."""


def configure_logging():
  """Our progress lines at INFO on stderr; libraries (Orbax, absl) only at WARNING and above."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("omnisage")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logger.addHandler(handler)


def init_distributed():
  """Joins the other processes of a multi-host job (module docstring); nothing on one host."""
  if not FLAGS.coordinator_address and FLAGS.distributed == "off":
    return
  if FLAGS.distributed == "off" and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id "
                         "(or --distributed=auto to detect them)")
  import jax
  # Cross-process computations on CPU devices need a collectives library; the setting must be in
  # place before the backend starts (older JAX releases default to none and then fail).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # With --distributed=auto, flags left unset (None) are detected from the cluster environment.
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.getLogger("omnisage").info("process %d of %d, %d local of %d devices",
                                     jax.process_index(), jax.process_count(),
                                     jax.local_device_count(), jax.device_count())


def emit(summary: dict):
  """The closing JSON line (only process 0 prints it)."""
  import jax
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)


def system_module(config):
  """The module of a non-OmniSearchSage system (SYSTEMS), or None for OmniSearchSage."""
  import importlib
  name = config.get("system", "omnisearchsage")
  if name == "omnisearchsage":
    return None
  if name not in SYSTEMS:
    raise UserError(f"config field system={name!r}: one of omnisearchsage, {', '.join(SYSTEMS)}")
  return importlib.import_module(SYSTEMS[name])


def cmd_prepare(config, workdir: str) -> dict:
  if (system := system_module(config)) is not None:
    return {"prepare": system.prepare(config, workdir)}
  from omnisage.data.omnisearchsage import prepare as prepare_lib
  from omnisage.data.omnisearchsage import synthetic
  raw_dir = config.data.raw_dir
  t0 = time.time()
  generated = None
  if not raw_dir:
    raw_dir = os.path.join(workdir, "raw")
    generated = synthetic.generate(config.synthetic, config.seed, raw_dir)
  out_dir = config.data.prepared_dir or os.path.join(workdir, "prepared")
  summary = prepare_lib.prepare(config, raw_dir, out_dir)
  print_bad_rows(summary.get("bad_rows", {}))
  return {"prepare": {"raw_dir": raw_dir, "prepared_dir": out_dir,
                      "synthetic": generated is not None,
                      **{k: v for k, v in summary.items() if k != "config"},
                      "step_seconds": summary.get("seconds"),
                      "seconds": round(time.time() - t0, 2)}}


def print_bad_rows(bad_rows: dict):
  if not bad_rows:
    return
  print("bad rows (dropped and counted):")
  for table, reasons in bad_rows.items():
    if isinstance(reasons, dict):
      for reason, count in sorted(reasons.items()):
        print(f"  {table:<14} {reason:<22} {count}")
    else:
      print(f"  {table:<14} {reasons}")


def cmd_train(config, workdir: str) -> dict:
  if (system := system_module(config)) is not None:
    return {"train": system.train(config, workdir)}
  from omnisage.train.omnisearchsage.trainer import train_and_evaluate
  return {"train": train_and_evaluate(config, workdir)}


def cmd_eval(config, workdir: str) -> dict:
  if (system := system_module(config)) is not None:
    return {"eval": system.evaluate(config, workdir)}
  from omnisage.train.omnisearchsage.trainer import evaluate_checkpoint
  result = evaluate_checkpoint(config, workdir)
  print_recall_table(result["recall@10"])
  return {"eval": result}


def print_recall_table(recall: dict):
  print(f"{'task':<12} {'untrained':>10} {'trained':>10}   Recall@10")
  for task, r in recall.items():
    print(f"{task:<12} {r['untrained']:>10.3f} {r['trained']:>10.3f}")


def cmd_demo(config, workdir: str) -> dict:
  """prepare -> train -> eval -> export -> embed -> index on the synthetic world, from scratch."""
  # Start the training part afresh so the demo always shows learning; only the demo's own
  # outputs are removed, never the whole workdir.
  for name in ("checkpoints", "tensorboard", "train_metrics.jsonl", "eval_trained.json",
               "eval_untrained.json"):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  prepared = cmd_prepare(config, workdir)
  print(json.dumps(prepared), flush=True)
  trained = cmd_train(config, workdir)["train"]
  print(json.dumps({"train": trained}), flush=True)
  result = cmd_eval(config, workdir)["eval"]
  retrieval = demo_serving(config, workdir)
  return {"demo": {"recall@10": result["recall@10"], "train_seconds": trained["train_seconds"],
                   "examples_per_second": trained["examples_per_second"],
                   "retrieval": retrieval}}


def demo_serving(config, workdir: str) -> dict:
  """The serving half of the demo: export -> embed -> index -> example searches."""
  from omnisage.serving.index.embed import KINDS, embed_entities
  from omnisage.serving.index.scann_index import build_index
  from omnisage.serving.omnisearchsage.export import export_bundle
  bundle = os.path.join(workdir, "bundle")
  embeddings = os.path.join(workdir, "embeddings")
  index = os.path.join(workdir, "index")
  exported = export_bundle(config, workdir, bundle)
  print(json.dumps({"export": {"bundle": bundle, "step": exported["step"]}}), flush=True)
  entities = os.path.join(config.data.prepared_dir or os.path.join(workdir, "prepared"),
                          "entities")
  for kind in KINDS:   # shards of the previous demo's bundle are recomputed (checksum differs)
    done = embed_entities(bundle, os.path.join(entities, f"{kind}.parquet"), embeddings)
    print(json.dumps({"embed": {k: done[k] for k in ("kind", "rows", "rows_per_second")}}),
          flush=True)
  built = build_index(embeddings, index)
  print_retrieval_table(built["kinds"])
  print_example_searches(bundle, index)
  pins = built["kinds"]["pins"]
  return {"scann_recall@10": pins["recall@10"], "scann_qps": round(pins["qps"], 1),
          "exact_qps": round(pins["exact_qps"], 1), "met_target": pins["met_target"],
          "kinds": {kind: {"recall@10": r["recall@10"], "qps": round(r["qps"], 1),
                           "exact_qps": round(r["exact_qps"], 1)}
                    for kind, r in built["kinds"].items()}}


def print_retrieval_table(kinds: dict):
  print("ScaNN index vs exact search (held-out query embeddings, Recall@10 against exact):")
  print(f"{'kind':<10} {'rows':>7} {'leaves searched/leaves':>23} {'reorder':>8} "
        f"{'recall@10':>10} {'QPS':>9} {'exact QPS':>10}")
  for kind, r in kinds.items():
    p = r["params"]   # small tables are searched brute force: no tree, no reorder
    leaves = f"{p.get('leaves_to_search') or '-'}/{p.get('num_leaves') or '-'}"
    print(f"{kind:<10} {r['size']:>7} {leaves:>23} {str(p.get('reorder') or '-'):>8} "
          f"{r['recall@10']:>10.4f} {r['qps']:>9.0f} {r['exact_qps']:>10.0f}")


def print_example_searches(bundle_path: str, index_path: str, top: int = 3):
  """Three real queries (spread over the query table) through tokenizer -> bundle -> index."""
  from omnisage.data.tokenizer import WordPieceTokenizer
  from omnisage.serving.bundle.loader import load_bundle
  from omnisage.serving.index.scann_index import load_index
  bundle = load_bundle(bundle_path)
  tokenizer = WordPieceTokenizer.from_bundle(bundle)
  indexes = load_index(index_path)
  titles = indexes["queries"].titles
  texts = [titles[i] for i in (0, len(titles) // 3, 2 * len(titles) // 3)]
  vectors = bundle.embed_queries(tokenizer.encode_batch(texts, bundle.dims["query_len"]))
  for text, vector in zip(texts, vectors):
    print(f"search {text!r}:")
    for kind, index in indexes.items():
      scores, rows = index.search(vector[None], top)
      # Some synthetic entities have no text at all (SPEC: features can be missing): show the id.
      found = ", ".join(f"{(index.titles[r] or index.ids[r])[:40]!r} ({s:.2f})"
                        for s, r in zip(scores[0], rows[0]))
      print(f"  {kind:<9} {found}")


def cmd_export(config, workdir: str) -> dict:
  if (system := system_module(config)) is not None:
    return {"export": system.export(config, workdir, FLAGS.out)}
  from omnisage.serving.omnisearchsage.export import export_bundle
  return {"export": export_bundle(config, workdir, FLAGS.out)}


def cmd_embed(config, workdir: str) -> dict:
  from omnisage.serving.bundle.loader import BundleError
  from omnisage.serving.index.embed import embed_entities
  from omnisage.serving.twotower.bundle import embed_items, is_twotower_bundle
  try:
    if is_twotower_bundle(FLAGS.bundle):   # SPEC §3: --entities is the bundle's items.parquet
      return {"embed": embed_items(FLAGS.bundle, FLAGS.entities, FLAGS.out,
                                   batch_size=FLAGS.embed_batch_size)}
    return {"embed": embed_entities(FLAGS.bundle, FLAGS.entities, FLAGS.out,
                                    batch_size=FLAGS.embed_batch_size)}
  except BundleError as error:   # a damaged bundle is the user's input, not our bug
    raise UserError(str(error)) from error


def cmd_index(config, workdir: str) -> dict:
  from omnisage.serving.index.scann_index import build_index
  return {"index": build_index(FLAGS.embeddings, FLAGS.out, target_recall=FLAGS.target_recall)}


def cmd_bench(config, workdir: str, which: str) -> dict:
  from benchmarks.retrieval import run_retrieval_bench
  return {"bench": {which: run_retrieval_bench(FLAGS.embeddings, FLAGS.out,
                                                synthetic_rows=FLAGS.bench_size)}}


def cmd_serve(config, workdir: str) -> dict:
  from omnisage.serving.bundle.loader import BundleError
  from omnisage.serving.omnisearchsage.service import serve
  from omnisage.serving.twotower.bundle import is_twotower_bundle
  try:
    if is_twotower_bundle(FLAGS.bundle):   # SPEC §3 home feed: POST /v1/recommend
      from omnisage.serving.twotower.service import serve_recommend
      index, routers = FLAGS.index, ()
      if FLAGS.pinnersage:   # SPEC §4 on the same item index: /v1/pinnersage/{update,recommend}
        from omnisage.serving.pinnersage.service.service import PinnerSageService, pinnersage_router

        from omnisage.serving.index.scann_index import load_index
        if not FLAGS.item_embeddings:
          raise UserError("serve --pinnersage needs --item-embeddings (the embeddings it used)")
        index = load_index(FLAGS.index)
        service = PinnerSageService.load(FLAGS.pinnersage, FLAGS.item_embeddings,
                                         index=index.get("items"))
        routers = (pinnersage_router(service),)
      return {"serve": serve_recommend(FLAGS.bundle, index, host=FLAGS.host, port=FLAGS.port,
                                       extra_routers=routers)}
    return {"serve": serve(FLAGS.bundle, FLAGS.index, host=FLAGS.host, port=FLAGS.port,
                           max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                           max_queue=FLAGS.max_queue, cache_size=FLAGS.cache_size,
                           cache_ttl_s=FLAGS.cache_ttl_days * 86400)}
  except BundleError as error:
    raise UserError(str(error)) from error


def cmd_pinnersage(config, workdir: str) -> dict:
  """PinnerSage batch job (SPEC §4): per-user Ward clusters -> medoids + importances (Parquet)."""
  from omnisage.serving.pinnersage.service.service import DEFAULTS, run_batch
  alpha = DEFAULTS["alpha"] if FLAGS.alpha is None else FLAGS.alpha
  return {"pinnersage": run_batch(FLAGS.item_embeddings, FLAGS.actions, FLAGS.out, alpha=alpha,
                                  lam=FLAGS.lambda_decay, window_days=FLAGS.window_days,
                                  now=FLAGS.now, kind=FLAGS.item_kind)}


def cmd_compile(config, workdir: str) -> dict:
  """AOT-compiles the train step for a target mesh without running it (issue 6 item 5)."""
  import jax

  from omnisage.train.omnisearchsage.aot import parse_mesh
  data, model = parse_mesh(FLAGS.mesh)
  # A mesh larger than the machine compiles for simulated CPU devices; their number can only be
  # set before JAX starts its backends (nothing has run yet: init_distributed only imports jax).
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", max(data * model, 1))
    except RuntimeError as error:   # backends already up: aot.pick_devices explains what to set
      logging.getLogger("omnisage").info("simulated devices not set: %s", error)
  from omnisage.train.omnisearchsage.aot import compile_report, print_report
  report = compile_report(config, FLAGS.mesh)
  print_report(report)
  return {"compile": report}


def check_args(argv):
  """Usage errors (exit 1 with absl's usage text) before any heavy import."""
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS or len(argv) != (3 if command == "bench" else 2):
    raise app.UsageError(f"usage: launch.py {{{','.join(COMMANDS)}}} [flags]; "
                         f"launch.py bench {{{','.join(BENCHES)}}} [flags]")
  if command == "bench" and argv[2] not in BENCHES:
    raise app.UsageError(f"unknown benchmark {argv[2]!r}: one of {BENCHES}")
  if command in CONFIG_COMMANDS:
    if FLAGS.config is None:
      raise app.UsageError("--config is required, e.g. --config=configs/omnisage_synthetic.py")
    if not FLAGS.workdir:
      raise app.UsageError("--workdir is required")
  if command == "index" and not (FLAGS.embeddings and FLAGS.out):
    raise app.UsageError("index needs --embeddings and --out")
  if command == "bench" and not FLAGS.out:
    raise app.UsageError("bench needs --out (where the table, plot and JSON go)")
  if command == "serve" and not (FLAGS.bundle and FLAGS.index):
    raise app.UsageError("serve needs --bundle and --index")
  if command == "pinnersage" and not (FLAGS.item_embeddings and FLAGS.actions and FLAGS.out):
    raise app.UsageError("pinnersage needs --item-embeddings, --actions and --out")
  if command == "compile" and not (FLAGS.config is not None and FLAGS.mesh):
    raise app.UsageError("compile needs --config and --mesh (e.g. --mesh=8x1)")


def main(argv):
  check_args(argv)
  if argv[1] == "export" and not FLAGS.out:
    raise app.UsageError("--out is required for export (the bundle directory to write)")
  if argv[1] == "embed" and not (FLAGS.bundle and FLAGS.entities and FLAGS.out):
    raise app.UsageError("embed needs --bundle, --entities and --out")
  configure_logging()
  # Before JAX or TensorFlow start their thread pools: threads that own an arena keep it.
  from omnisage.train.host_memory import reuse_freed_host_memory
  if FLAGS.host_malloc == "reuse" and not reuse_freed_host_memory():
    logging.getLogger("omnisage").info("--host_malloc=reuse: not glibc, malloc left as it is")
  init_distributed()
  command = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo,
             "export": cmd_export, "embed": cmd_embed, "index": cmd_index, "serve": cmd_serve,
             "pinnersage": cmd_pinnersage, "compile": cmd_compile,
             "bench": lambda config, workdir: cmd_bench(config, workdir, argv[2])}
  try:
    summary = command[argv[1]](FLAGS.config, FLAGS.workdir)
  except (FileNotFoundError, ValueError, UserError) as error:
    print(f"error: {error}", file=sys.stderr)
    emit({argv[1]: {"error": str(error)}})
    sys.exit(2)
  emit(summary)


def dashes_to_underscores(args: list[str]) -> list[str]:
  """`--target-recall=0.95` -> `--target_recall=0.95` (flag names only, never values)."""
  out = []
  for arg in args:
    if arg.startswith("--") and not arg.startswith("--config."):
      name, sep, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + sep + value
    out.append(arg)
  return out


if __name__ == "__main__":
  app.run(main, argv=dashes_to_underscores(sys.argv))
