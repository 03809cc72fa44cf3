"""What CPU a benchmark ran on, for its JSON line: speed ratios against peers depend on it.

XLA's CPU matmuls use AVX-512 where the core has it, and a core that executes 512-bit
instructions at full width (AMD Zen 5, family 26) doubles their throughput over one that splits
them in two (Zen 4, family 25); a peer built on another BLAS may not gain the same way. So every
side-by-side benchmark records the model, family and the vector extensions it saw.

Usage: from benchmarks.machine import cpu_summary; summary["cpu"] = cpu_summary()
"""

import os

VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_summary(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """{"model", "vendor", "family", "model_number", "cpus", "vector_flags"} of the first CPU."""
  fields: dict[str, str] = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break   # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass   # not Linux: only what os knows
  flags = set(fields.get("flags", "").split())
  return {"model": fields.get("model name", "unknown"), "vendor": fields.get("vendor_id", ""),
          "family": fields.get("cpu family", ""), "model_number": fields.get("model", ""),
          "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(),
          "vector_flags": [f for f in VECTOR_FLAGS if f in flags]}
