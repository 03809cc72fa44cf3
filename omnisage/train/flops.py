"""FLOP counting and peak measurement, shared by benchmarks/efficiency.py, train/aot.py and
benchmarks/accelerator.py.

Three sources of a FLOP figure, so each can check the others:
  compiled_flops(compiled)   XLA's own count for a compiled executable (`cost_analysis()["flops"]`).
                             For a jitted train step that is the WHOLE program: forward, backward
                             and optimiser update. Under SPMD it is the per-device program's count.
                             It counts a while loop's body once (a scan-based loss is undercounted)
                             and includes elementwise ops, so it is >= the matmul-only count.
  model_flops(...)           an analytic count of the matmuls of OmniSearchSage's towers and loss
                             (the usual 2 * multiply-adds; training = 3x forward: one forward, two
                             backward matmuls per forward matmul, as in the "6 * params * tokens"
                             rule). Embedding gathers count 0.
  measure_matmul_peak(...)   achieved FLOP/s of a large jitted matmul on a device: the practical
                             ceiling that MFU-style ratios are taken against, next to the vendor's
                             datasheet peak (KNOWN_PEAKS) where the device is known;
                             measure_concurrent_matmul_flops: several devices at once, any shape.

Usage:
  peak = measure_matmul_peak(jax.devices()[0], n=2048)        # {"flops_per_second": ..., ...}
  f = model_flops(config, vocab_sizes)                        # {"query_tower": ..., "total": ...}
  xla = compiled_flops(jax.jit(step).lower(*args).compile())
"""

import time

import jax
import jax.numpy as jnp

from omnisage.data.omnisearchsage import schema
from omnisage.models.entity_tower import CONTINUOUS_DIM

# Dense (no sparsity) datasheet peaks in TFLOP/s, by a substring of jax's `device_kind`.
# Sources: NVIDIA H100/H200 and A100 datasheets (SXM parts; tf32/bf16 "with sparsity" halved).
KNOWN_PEAKS = {
    "H200": {"bfloat16": 989.5, "tf32": 494.7, "float32": 66.9},
    "H100 80GB HBM3": {"bfloat16": 989.5, "tf32": 494.7, "float32": 66.9},   # H100 SXM
    "H100 PCIe": {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.2},
    "H100": {"bfloat16": 989.5, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5},
}


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (None when the backend does not report one)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):   # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def known_peak(device_kind: str, precision: str) -> float | None:
  """Datasheet dense peak in FLOP/s for a device kind ("NVIDIA H200") and precision, or None."""
  for key, peaks in KNOWN_PEAKS.items():   # most specific keys first (dict order)
    if key.lower() in device_kind.lower():
      tflops = peaks.get(precision)
      return None if tflops is None else tflops * 1e12
  return None


def measure_matmul_peak(device=None, n: int = 2048, dtype=jnp.float32, repeats: int = 5,
                        precision: str | None = None) -> dict:
  """Best achieved FLOP/s of an n x n @ n x n matmul (jitted, on `device`) over `repeats` calls.

  precision: jax.lax.Precision name ("highest" forces full f32 on GPUs, "default" lets them use
  tf32 for f32 inputs); None keeps jax's default. The best call is reported: the peak is a ceiling.
  """
  device = device or jax.devices()[0]
  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.device_put(jax.random.normal(keys[0], (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(keys[1], (n, n), dtype), device)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
  seconds = _best_seconds(f, [(a, b)], repeats)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "precision": precision or "default",
          "device": str(device.device_kind), "seconds": seconds,
          "flops_per_second": 2.0 * n ** 3 / seconds}


def measure_concurrent_matmul_flops(m: int, k: int, n: int, devices=None,
                                    repeats: int = 10) -> float:
  """Summed f32 FLOP/s of every device in `devices` running its own [m, k] @ [k, n] at once.

  For work dealt to several devices in turn (text_encoder.SentenceEncoder on N CPU devices), the
  ceiling is what the devices achieve together, not one device alone.
  """
  devices = devices or jax.devices()[:1]
  f = jax.jit(jnp.matmul)
  args = [jax.device_put((jnp.ones((m, k)), jnp.ones((k, n))), d) for d in devices]
  return len(args) * 2.0 * m * k * n / _best_seconds(f, args, repeats)


def _best_seconds(f, args_per_call: list[tuple], repeats: int) -> float:
  """Fastest of `repeats` rounds of f(*args) for every args at once (compiled and warmed first)."""
  jax.block_until_ready([f(*args) for args in args_per_call])
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([f(*args) for args in args_per_call])
    best = min(best, time.perf_counter() - t0)
  return best


def transformer_forward_flops(layers: int, hidden: int, intermediate: int, seq: int) -> float:
  """Matmul FLOPs of one sequence through `layers` BERT layers (forward only).

  Per token and layer: Q, K, V and output projections 4 * 2h^2, feed-forward 2 * 2 h i; attention
  scores and the weighted sum 2 * 2 * seq * h.
  """
  per_token = 8 * hidden * hidden + 4 * hidden * intermediate + 4 * seq * hidden
  return float(layers * seq * per_token)


def query_tower_forward_flops(query_config, embed_dim: int, seq: int) -> float:
  """One sequence through the query tower: the transformer plus the projection head."""
  q = query_config
  return transformer_forward_flops(q.layers, q.hidden, q.intermediate, seq) \
      + 2.0 * q.hidden * embed_dim


def entity_tower_forward_flops(model_config, tokens: int) -> float:
  """One entity through the unified tower: hashed bag of n-grams (2 rows weighted per token, the
  per-field one-hot sum) and the MLP (text + continuous -> hidden -> hidden -> embed)."""
  d, h = model_config.text_dim, model_config.mlp_hidden
  fields = len(schema.FIELDS)
  bag = tokens * (2 * 2 * d + 2 * fields * d)
  mlp = 2 * ((d + CONTINUOUS_DIM) * h + h * h + h * model_config.embed_dim)
  return float(bag + mlp)


def model_flops(config, train: bool = True) -> dict:
  """Analytic matmul FLOPs of one global train step (train=True: 3x forward) by component.

  Counts what the step computes: per task the query tower on its queries, the positive side (query
  tower for q2query, entity tower otherwise), the random negatives, and the B x B and B x N logits
  (plus the compatibility tasks' logits against the legacy vectors).
  """
  m, q, data = config.model, config.model.query, config.data
  seq = int(data.batch_query_len)
  ent_tokens = int(data.max_entity_tokens)
  n = int(config.loss.random_negatives)
  d = m.embed_dim
  query_one = query_tower_forward_flops(q, d, seq)
  entity_one = entity_tower_forward_flops(m, ent_tokens)
  parts = {"query_tower": 0.0, "entity_tower": 0.0, "logits": 0.0}
  for task in schema.TASK_ENTITY:
    b = int(config.tasks[task])
    if b <= 0:
      continue
    rows = b + n   # positives and random negatives
    parts["query_tower"] += b * query_one
    if schema.TASK_ENTITY[task] == "queries":
      parts["query_tower"] += rows * query_one
    else:
      parts["entity_tower"] += rows * entity_one
    parts["logits"] += 2.0 * b * (b + n) * d
    if config.tasks.compat and schema.TASK_ENTITY[task] != "queries":
      parts["logits"] += 2.0 * b * (b + n) * m.compat_dim
  factor = 3.0 if train else 1.0
  out = {k: factor * v for k, v in parts.items()}
  out["total"] = sum(out.values())
  return out


def param_count_flops_estimate(query_params: int, tokens: int) -> float:
  """The "6 * params * tokens" rule of thumb (2 per multiply-add, x3 for fwd + bwd) for a
  transformer whose non-embedding parameters are `query_params`; ignores attention scores."""
  return 6.0 * query_params * tokens


def summarise(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> dict:
  """Achieved FLOP/s of a step and its fraction of a peak."""
  achieved = flops_per_step / step_seconds
  return {"flops_per_step": flops_per_step, "flops_per_second": achieved,
          "fraction_of_peak": achieved / peak_flops_per_second if peak_flops_per_second else None}

