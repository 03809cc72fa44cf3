"""Training health logs: one JSONL file and TensorBoard event files per run.

STYLE lesson 9: log health every step that is logged — loss per task, gradient and parameter norms,
temperature, step time, examples per second. JSONL is for scripts (the tests read it); TensorBoard
(tensorboardX, which needs no TensorFlow) is for people. Only process 0 writes.

Usage: `w = MetricsWriter(workdir); w.write(step, {"loss": 1.2}); w.close()`.
"""

import json
import os

import jax
import numpy as np


class MetricsWriter:
  def __init__(self, workdir: str, name: str = "train"):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, f"{name}_metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", buffering=1)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", name))
      except ImportError:  # TensorBoard is optional; JSONL is the record
        self._tb = None

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json_line({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for key, value in clean.items():
        # TensorBoard tag names allow no '@'.
        self._tb.add_scalar(key.replace("@", "_at_"), value, int(step))

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def json_line(obj) -> str:
  """`obj` as strict JSON (never a bare NaN or Infinity, which JSON does not have): each
  non-finite number becomes null and its path is listed under "nonfinite_values"."""
  paths = []

  def clean(x, path):
    if isinstance(x, dict):
      return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
      paths.append(path)
      return None
    if isinstance(x, np.generic):
      return x.item()
    return x

  out = clean(obj, "")
  if paths and isinstance(out, dict):
    out["nonfinite_values"] = paths
  return json.dumps(out, allow_nan=False)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
