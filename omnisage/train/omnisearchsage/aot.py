"""Compile-only check: AOT-compile the train step for a target mesh and report its memory and FLOPs.

`launch.py compile --config X --mesh 8x1` lowers and compiles the SAME jitted train step as
trainer.py (same in/out shardings, same donation) from abstract arguments only:
  - the train state comes from nnx.eval_shape / jax.eval_shape, so no parameter is allocated;
  - the batch is a tree of ShapeDtypeStructs derived from the config exactly as the training
    input (omnisage/data/omnisearchsage/feature_pipeline.FeatureTrainData) yields it
    (tests/test_aot.py checks the two agree), so prepare need not run;
  - vocabulary sizes are the config's (data.query_vocab_size or model.query.vocab_size, and
    V = 1 + trigram + unigram + bigram vocabularies, the stacked id space of schema.py).

The report is per device: under SPMD the compiled program IS one device's program, and
`compiled.memory_analysis()` gives its argument, output, temp (activations, gradients, collective
buffers) and generated-code bytes; donated state buffers are aliased to outputs (alias bytes), so
the peak is argument + output - alias + temp. FLOPs are `cost_analysis()` of that per-device
program (forward + backward + optimiser), next to the analytic count (omnisage/train/flops.py).

Compiling for a mesh larger than the machine uses simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, or jax_num_cpu_devices, which `launch.py
compile` sets itself before JAX starts its backends). CPU-compiled memory is an ESTIMATE of
accelerator memory: the CPU backend fuses, lays out and schedules differently from GPU/TPU, and
has no bf16 or cuDNN/cuBLAS workspaces.

Usage:
  report = compile_report(config, "8x1")   # {"mesh": ..., "per_device": {...}, "flops": {...}}
"""

import functools
import logging
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from omnisage.data.omnisearchsage import schema
from omnisage.data.omnisearchsage.query_input import lexical_len
from omnisage.models import build_model
from omnisage.models.entity_tower import CONTINUOUS_DIM
from omnisage.train import flops as flops_lib
from omnisage.train import frequency, sharding
from omnisage.train.omnisearchsage.step import train_step
from omnisage.train.omnisearchsage.trainer import check_divisible
from omnisage.train.state import Statics, TrainState, make_optimizer, train_state_specs

log = logging.getLogger(__name__)
GiB = 1 << 30


def parse_mesh(mesh_str: str) -> tuple[int, int]:
  """"8x1" -> (data=8, model=1); anything else is a ValueError naming the flag."""
  parts = str(mesh_str or "").lower().split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh={mesh_str!r}: expected DATAxMODEL with positive integers, e.g. 8x1")
  return int(parts[0]), int(parts[1])


def config_vocab_sizes(config) -> dict:
  """The vocabulary sizes prepare would produce for `config` (upper bounds: a learned vocabulary
  can come out smaller), without running it."""
  d = config.data
  query = int(config.model.query.get("vocab_size", 0) or d.query_vocab_size)
  return {"query": query, "ngram": 1 + int(d.trigram_vocab + d.unigram_vocab + d.bigram_vocab)}


def abstract_batch(config) -> dict:
  """ShapeDtypeStructs of one GLOBAL batch as FeatureTrainData yields it (per task: the pairs,
  their positives' inputs, the shared random and compatibility negatives, and with
  loss.hard_negatives = k the [B, k] hard-negative slots, which every task carries)."""
  d, n = config.data, int(config.loss.random_negatives)
  hard_k = int(config.loss.get("hard_negatives", 0))
  query_width = d.batch_query_len + lexical_len(config)
  sds = jax.ShapeDtypeStruct
  i32, f32 = jnp.int32, jnp.float32

  def entity(kind: str, rows: tuple, prefix: str, legacy: bool) -> dict:
    if kind == "queries":   # queries as entities: the query tower's input rows
      return {f"{prefix}_tokens": sds((*rows, query_width), i32)}
    width = d.max_entity_tokens
    out = {f"{prefix}_tokens": sds((*rows, width), i32),
           f"{prefix}_fields": sds((*rows, width), i32),
           f"{prefix}_continuous": sds((*rows, CONTINUOUS_DIM), f32)}
    if legacy:   # negatives drop their legacy vectors (feature_pipeline.entity_inputs)
      out.update({f"{prefix}_legacy": sds((*rows, schema.LEGACY_DIM), f32),
                  f"{prefix}_has_legacy": sds(rows, jnp.bool_)})
    return out

  batch = {}
  for task, kind in schema.TASK_ENTITY.items():
    b = int(config.tasks[task])
    if b <= 0:
      continue
    t = {"query_tokens": sds((b, query_width), i32), "query_ids": sds((b,), i32),
         "pos_ids": sds((b,), i32)}
    t.update(entity(kind, (b,), "pos", legacy=True))
    t.update({"neg_ids": sds((n,), i32), "neg_log_q": sds((n,), f32)})
    t.update(entity(kind, (n,), "neg", legacy=False))
    if hard_k > 0:
      t.update({"hard_ids": sds((b, hard_k), i32), "hard_valid": sds((b, hard_k), jnp.bool_)})
      t.update(entity(kind, (b, hard_k), "hard", legacy=False))
    if config.tasks.compat and kind != "queries":   # kinds with legacy vectors
      t.update({"compat_neg_ids": sds((n,), i32),
                "compat_neg_legacy": sds((n, schema.LEGACY_DIM), f32),
                "compat_neg_log_q": sds((n,), f32)})
    batch[task] = t
  return batch


def abstract_train_state(config, vocab_sizes: dict, mesh) -> tuple[TrainState, Statics]:
  """The train state and statics of state.create_train_state as ShapeDtypeStructs carrying their
  shardings (same specs: state.train_state_specs), with nothing allocated."""
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: build_model(config, vocab_sizes))
    graphdef, params, constants = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(config.train, config.model)
    freq_cfg = config.loss.freq
    specs = train_state_specs(optimizer, params, freq_cfg)
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
        freq=jax.eval_shape(lambda: frequency.init_freq(freq_cfg.size, freq_cfg.num_hashes)),
        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    state = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        shapes, specs, is_leaf=lambda x: is_spec(x) or isinstance(x, jax.ShapeDtypeStruct))
    const_specs = nnx.get_partition_spec(constants)
    constants = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        constants, const_specs,
        is_leaf=lambda x: is_spec(x) or isinstance(x, jax.ShapeDtypeStruct))
  return state, Statics(graphdef, constants)


def pick_devices(count: int):
  """`count` devices of the default backend, else of the CPU backend (simulated devices)."""
  for backend in (None, "cpu"):
    devices = jax.devices(backend)
    if len(devices) >= count:
      return devices[:count]
  raise ValueError(
      f"--mesh needs {count} devices but only {len(jax.devices())} exist: set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts")


def lower_train_step(config, mesh, vocab_sizes: dict | None = None):
  """jax.jit(train_step).lower(...) on abstract state and batch; shardings as in trainer.py."""
  vocab_sizes = vocab_sizes or config_vocab_sizes(config)
  state, statics = abstract_train_state(config, vocab_sizes, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       abstract_batch(config))
  optimizer = make_optimizer(config.train, config.model)
  step_fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer),
                    in_shardings=(None, state_shardings, batch_sharding),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(1,))
  return step_fn.lower(statics, state, batch), state


def memory_report(compiled) -> dict:
  """Per-device bytes of a compiled executable, and the peak they imply."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "generated_code_bytes": int(m.generated_code_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"] + out["generated_code_bytes"])
  reported_peak = getattr(m, "peak_memory_in_bytes", 0)
  if reported_peak:
    out["xla_peak_bytes"] = int(reported_peak)
  return out


def compile_report(config, mesh_str: str, device_memory_gib: float = 80.0) -> dict:
  """AOT-compiles the train step of `config` for mesh DATAxMODEL; per-device memory and FLOPs."""
  data, model = parse_mesh(mesh_str)
  devices = pick_devices(data * model)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.data, config.mesh.model = data, model
  mesh = sharding.make_mesh(config.mesh, devices)
  check_divisible(config, mesh)
  vocab = config_vocab_sizes(config)
  t0 = time.time()
  lowered, state = lower_train_step(config, mesh, vocab)
  lower_s = time.time() - t0
  compiled = lowered.compile()
  compile_s = time.time() - t0 - lower_s
  memory = memory_report(compiled)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  per_device_flops = flops_lib.compiled_flops(compiled)
  analytic = flops_lib.model_flops(config)
  pairs = sum(int(config.tasks[t]) for t in schema.TASK_ENTITY)
  limit = device_memory_gib * GiB
  chunk_rows = int(config.train.get("tower_chunk_rows", 0))
  xla_counts = "forward + backward + optimiser update (the whole jitted step)"
  if chunk_rows > 0:
    # XLA's cost analysis counts a while loop's body once, so the chunked towers are undercounted
    # by their number of chunks; the analytic count is the one to read.
    xla_counts += (f"; towers run in chunks of {chunk_rows} rows per device (a while loop whose "
                   "body XLA counts once): use the analytic count")
  report = {
      "mesh": {"data": data, "model": model}, "platform": devices[0].platform,
      "simulated": devices[0].platform == "cpu",
      "global_batch_pairs": pairs, "random_negatives": int(config.loss.random_negatives),
      "loss_impl": str(config.loss.get("impl", "dense")), "tower_chunk_rows": chunk_rows,
      "vocab": vocab, "parameters": params,
      "per_device": {**memory, "peak_gib": round(memory["peak_bytes"] / GiB, 3)},
      "fits": {"device_memory_gib": device_memory_gib, "fits": memory["peak_bytes"] <= limit,
               "headroom_gib": round((limit - memory["peak_bytes"]) / GiB, 3)},
      "flops": {"per_device_xla": per_device_flops,
                # Replicated work (e.g. the optimiser update) is counted once per device here.
                "global_xla": per_device_flops * data * model if per_device_flops else None,
                "analytic_global": analytic["total"],
                "analytic_parts": {k: v for k, v in analytic.items() if k != "total"},
                # Chunked towers (microbatch.py) re-run their forward in backward: hardware FLOPs
                # = analytic + one more forward of the towers (model FLOPs exclude it, as in MFU).
                "recompute_global": (analytic["query_tower"] + analytic["entity_tower"]) / 3
                                    if chunk_rows > 0 else 0.0,
                "xla_counts": xla_counts},
      "seconds": {"lower": round(lower_s, 1), "compile": round(compile_s, 1)},
      "note": ("memory from the CPU backend's compiled executable: an estimate of accelerator "
               "memory (other fusion, layouts, no bf16)" if devices[0].platform == "cpu" else
               "memory from the target backend's compiled executable"),
  }
  log.info("compiled %dx%d: %.2f GiB per device", data, model, memory["peak_bytes"] / GiB)
  return report


def print_report(report: dict):
  """The human table of a compile report (per-device memory, FLOPs)."""
  mem, fits, fl = report["per_device"], report["fits"], report["flops"]
  mesh = f"{report['mesh']['data']}x{report['mesh']['model']}"
  where = "simulated CPU devices" if report["simulated"] else report["platform"]
  print(f"train step compiled for mesh {mesh} ({where}), global batch "
        f"{report['global_batch_pairs']} pairs, {report['random_negatives']} random negatives per "
        f"task, "
        f"loss {report['loss_impl']}, tower chunks of {report['tower_chunk_rows'] or 'all'} rows "
        f"per device, {report['parameters']:,} parameters")
  print(f"{'per device':<22} {'GiB':>9}")
  for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
              "generated_code_bytes", "peak_bytes"):
    print(f"{key.replace('_bytes', ''):<22} {mem[key] / GiB:>9.3f}")
  verdict = "fits" if fits["fits"] else "does NOT fit"
  print(f"peak {mem['peak_gib']:.2f} GiB {verdict} in {fits['device_memory_gib']:.0f} GiB "
        f"(headroom {fits['headroom_gib']:.2f} GiB); {report['note']}")
  xla = fl["global_xla"]
  ratio = f"{xla / fl['analytic_global']:.2f}" if xla and fl["analytic_global"] else "-"
  print(f"FLOPs per step: XLA {xla or 0:.3e} (per-device program x devices: replicated work "
        f"counts on each), analytic {fl['analytic_global']:.3e}, XLA/analytic {ratio}")


def compile_for_mesh(config, mesh_str: str) -> dict:
  """`launch.py compile`: simulated CPU devices when the mesh is larger than the machine, then
  the report, printed and returned."""
  import logging
  import os
  data, model = parse_mesh(mesh_str)
  # Their number can only be set before JAX starts its backends (nothing has run yet).
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", max(data * model, 1))
    except RuntimeError as error:   # backends already up: pick_devices explains what to set
      logging.getLogger("omnisage").info("simulated devices not set: %s", error)
  report = compile_report(config, mesh_str)
  print_report(report)
  return report
