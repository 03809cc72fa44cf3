"""The command lines of earlier releases, translated for launch.py (and printed in their new form).

  --target-recall=0.95               -> --target_recall=0.95 (flag names take '-' or '_')
  launch.py serve --bundle=B         -> launch.py serve --config=configs/serve.py --config.bundle=B
  launch.py pinnersage --out=D ...   -> launch.py train --config=configs/pinnersage_movielens.py
                                        --workdir=D --config.<field>=...

Usage: `argv = translate_argv(sys.argv, "configs", {"serve": "serve.py", ...})`.
"""

import os
import sys

# Flags of earlier releases -> the config field that replaced them.
LEGACY = {"bundle": "bundle", "entities": "entities", "embed_batch_size": "batch_size",
          "embeddings": "embeddings", "target_recall": "target_recall",
          "bench_size": "bench_size", "index": "index", "host": "host", "port": "port",
          "max_batch": "max_batch", "max_wait_ms": "max_wait_ms", "max_queue": "max_queue",
          "cache_size": "cache_size", "cache_ttl_days": "cache_ttl_days",
          "pinnersage": "pinnersage", "item_embeddings": "item_embeddings",
          "auth_token_file": "auth_token_file",
          "actions": "actions", "alpha": "alpha", "lambda_decay": "lam",
          "window_days": "window_days", "now": "now", "item_kind": "item_kind"}


def translate_argv(argv: list[str], configs_dir: str, job_configs: dict) -> list[str]:
  """Flag names with '-' -> '_'; the default config of embed/index/bench/serve; the flags and
  the `pinnersage` command of earlier releases -> their config form (printed once each)."""
  out = []
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config."):
      name, sep, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + sep + value
    out.append(arg)
  command = out[1] if len(out) > 1 else None
  if command == "pinnersage":   # the batch job is PinnerSage's `train` now
    out[1] = "train"
    out.insert(2, f"--config={os.path.join(configs_dir, 'pinnersage_movielens.py')}")
    out = ["--workdir=" + a[len("--out="):] if a.startswith("--out=") else a for a in out]
    _note("launch.py pinnersage --out=DIR", "launch.py train "
          "--config=configs/pinnersage_movielens.py --workdir=DIR")
  elif command in job_configs:
    legacy = any(a[2:].partition("=")[0] in LEGACY for a in out if a.startswith("--"))
    if legacy:   # earlier releases ignored a system --config here; its own config replaces it
      out = [a for a in out if not a.startswith("--config=")]
    if not any(a.startswith("--config=") for a in out):
      out.insert(2, f"--config={os.path.join(configs_dir, job_configs[command])}")
  for i, arg in enumerate(out):
    name, sep, value = arg[2:].partition("=")
    if arg.startswith("--") and name in LEGACY:
      out[i] = f"--config.{LEGACY[name]}{sep}{value}"
      _note(f"--{name}", f"--config.{LEGACY[name]}")
  return out


def _note(old: str, new: str):
  print(f"note: `{old}` is `{new}` now", file=sys.stderr)
