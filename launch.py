"""omnisage's one entry point: parse flags, set up jax.distributed, dispatch (docs/cli.md).

  python launch.py prepare|train|eval|demo --config=configs/omnisage_synthetic.py \
      --workdir=runs/demo
  python launch.py export  --config=... --workdir=runs/demo --out=runs/demo/bundle
  python launch.py compile --config=configs/omnisage_production.py --mesh=8x1
  python launch.py mine    --config=configs/omnisage_homedepot.py --workdir=runs/hd   # negatives
  python launch.py embed   --config.bundle=runs/demo/bundle \
      --config.entities=runs/demo/prepared/entities/pins.parquet --out=runs/demo/embeddings
  python launch.py index   --config.embeddings=runs/demo/embeddings --out=runs/demo/index
  python launch.py bench retrieval --config.embeddings=runs/demo/embeddings --out=runs/demo/bench
  python launch.py serve   --config.bundle=runs/demo/bundle --config.index=runs/demo/index

A config's `system` field picks the system (omnisage/systems.py: OmniSearchSage, PinText, the
two-tower model, PinnerSage). embed, index and bench read configs/index.py and serve reads
configs/serve.py unless --config says otherwise. Config values are overridden with
`--config.train.steps=100`; a config file takes an argument after a colon (`...py:tiny`). Flag
names take '-' or '_'. The flags of earlier releases (`--bundle`, `--port`, `launch.py
pinnersage ...`) still work and print their new spelling. Every subcommand ends by printing ONE
JSON line with its key figures. Multi-host jobs: docs/multihost.md.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from omnisage.cli_compat import translate_argv

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_COMMANDS = ("prepare", "train", "eval", "demo", "export", "compile", "mine")
JOB_CONFIGS = {"embed": "index.py", "index": "index.py", "bench": "index.py", "serve": "serve.py"}
COMMANDS = SYSTEM_COMMANDS + tuple(JOB_CONFIGS)
BENCHES = ("retrieval",)
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (ml_collections).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for prepared data, checkpoints and logs.")
flags.DEFINE_string("out", None, "export: the bundle directory; embed, index, bench: the "
                    "output directory.")
flags.DEFINE_string("mesh", None, "compile: target mesh as DATAxMODEL, e.g. 8x1.")
flags.DEFINE_enum("host_malloc", "reuse", ["reuse", "default"],
                  "reuse: keep freed host memory in the process (omnisage.train.host_memory) "
                  "so XLA's CPU step temporaries are not page-faulted in every step.")
flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                  "auto: jax.distributed.initialize() detects the cluster.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def check_args(argv) -> str:
  """The command, after usage errors (exit 1 with absl's usage text) and before heavy imports."""
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS or len(argv) != (3 if command == "bench" else 2):
    raise app.UsageError(f"usage: launch.py {{{','.join(COMMANDS)}}} [flags]; "
                         f"launch.py bench {{{','.join(BENCHES)}}} [flags]")
  if command == "bench" and argv[2] not in BENCHES:
    raise app.UsageError(f"unknown benchmark {argv[2]!r}: one of {BENCHES}")
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/omnisage_synthetic.py")
  needs = {"export": ["--out"], "compile": ["--mesh"], "embed": ["bundle", "entities", "--out"],
           "index": ["embeddings", "--out"], "bench": ["embeddings", "--out"],
           "serve": ["bundle", "index"]}.get(command, [])
  if command in SYSTEM_COMMANDS and command != "compile":
    needs = ["--workdir"] + needs
  missing = [n if n.startswith("--") else f"--config.{n}" for n in needs
             if not (getattr(FLAGS, n[2:]) if n.startswith("--") else config.get(n))]
  if missing:
    raise app.UsageError(f"{command} needs {', '.join(missing)}")
  return command


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
  """Joins the other processes of a multi-host job (docs/multihost.md); nothing on one host."""
  if not FLAGS.coordinator_address and FLAGS.distributed == "off":
    return
  if FLAGS.distributed == "off" and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id "
                         "(or --distributed=auto to detect them)")
  import jax
  # Cross-process computations on CPU devices need a collectives library, set before the
  # backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.getLogger("omnisage").info("process %d of %d, %d local of %d devices",
                                     jax.process_index(), jax.process_count(),
                                     jax.local_device_count(), jax.device_count())


def dispatch(command: str, argv) -> dict:
  """Runs one subcommand; returns its summary."""
  config, workdir, out = FLAGS.config, FLAGS.workdir, FLAGS.out
  if command in SYSTEM_COMMANDS:
    from omnisage.systems import get_system
    system = get_system(config)
  if command == "demo":
    from omnisage.demo import run_demo
    return run_demo(config, workdir)
  if command == "compile":
    from omnisage.train.omnisearchsage.aot import compile_for_mesh
    return compile_for_mesh(config, FLAGS.mesh)
  if command == "mine":   # OmniSearchSage's hard negatives from a checkpoint
    from omnisage.train.omnisearchsage.mine import mine_hard_negatives
    return mine_hard_negatives(config, workdir)
  if command in ("prepare", "train"):
    return system.run(command, config, workdir)
  if command == "eval":
    return system.run("evaluate", config, workdir)
  if command == "export":
    return system.run("export", config, workdir, out)
  if command == "embed":
    from omnisage.serving.index.embed import embed_job
    return embed_job(config, out)
  if command == "index":
    from omnisage.serving.index.scann_index import build_index
    return build_index(config.embeddings, out, target_recall=config.target_recall)
  if command == "bench":
    from benchmarks.retrieval import run_retrieval_bench
    return {argv[2]: run_retrieval_bench(config.embeddings, out,
                                         synthetic_rows=config.bench_size)}
  from omnisage.systems import system_of_bundle  # serve: the bundle says which system
  return system_of_bundle(config.bundle).run("serve", config)


def main(argv, key: str):
  command = check_args(argv)
  configure_logging()
  # Before JAX or TensorFlow start their thread pools: threads that own an arena keep it.
  from omnisage.train.host_memory import reuse_freed_host_memory
  if FLAGS.host_malloc == "reuse" and not reuse_freed_host_memory():
    logging.getLogger("omnisage").info("--host_malloc=reuse: not glibc, malloc left as it is")
  init_distributed()
  import jax
  try:
    summary = {key: dispatch(command, argv)}
  except (FileNotFoundError, ValueError) as error:   # the user's input, not our bug
    print(f"error: {error}", file=sys.stderr)
    summary, code = {key: {"error": str(error)}}, 2
  else:
    code = 0
  if jax.process_index() == 0:   # the closing JSON line: strict JSON, NaN never printed bare
    from omnisage.train.metrics import json_line
    print(json_line(summary), flush=True)
  sys.exit(code)


if __name__ == "__main__":
  # The JSON key is the command as typed (`pinnersage` of earlier releases included).
  key = sys.argv[1] if len(sys.argv) > 1 else ""
  # ml_collections finds `--config.<field>` overrides in sys.argv itself, so it is replaced.
  sys.argv = translate_argv(sys.argv, os.path.join(HERE, "configs"), JOB_CONFIGS)
  app.run(lambda argv: main(argv, key), argv=sys.argv)
