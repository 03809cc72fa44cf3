"""The four systems of SPEC.md behind one interface, found by the config's `system` field.

Every system exposes the same steps, each a function of (config, workdir[, out]) -> summary dict:

  prepare   raw data -> <workdir>/prepared (or config.data.prepared_dir)
  train     the shared training loop (omnisage/train/loop.py) or, for PinnerSage, its batch job
  evaluate  the evaluators of `config.evals` on the newest checkpoint
  export    the newest checkpoint -> a serving bundle directory `out`
  serve     (serving config) -> runs the system's HTTP service until SIGINT/SIGTERM

A step a system does not have is None; asking for it is a usage error that says so. The functions
are named by import path and imported on first use, so `launch.py` pulls in only what the command
needs (TensorFlow stays out of training; JAX models stay out of `prepare`).

  | system          | config                          | SPEC |
  |-----------------|---------------------------------|------|
  | omnisearchsage  | configs/omnisage_synthetic.py   | §1   |
  | pintext         | configs/pintext.py              | §2   |
  | twotower        | configs/twotower_movielens.py   | §3   |
  | pinnersage      | configs/pinnersage_movielens.py | §4   |

Usage:
  system = get_system(config)                 # by config.system
  summary = system.run("train", config, workdir)
"""

import dataclasses
import importlib

STEPS = ("prepare", "train", "evaluate", "export", "serve")


@dataclasses.dataclass(frozen=True)
class System:
  name: str
  prepare: str | None
  train: str | None
  evaluate: str | None
  export: str | None
  serve: str | None
  note: str = ""   # why a step is missing

  def function(self, step: str):
    """The function of `step` ("module:function"), imported now; ValueError when it has none."""
    if step not in STEPS:
      raise ValueError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    path = getattr(self, step)
    if path is None:
      raise ValueError(f"system {self.name!r} has no {step} step" + (f": {self.note}"
                                                                       if self.note else ""))
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)

  def run(self, step: str, *args, **kwargs) -> dict:
    return self.function(step)(*args, **kwargs)


SYSTEMS = {s.name: s for s in (
    System("omnisearchsage",
           prepare="omnisage.data.omnisearchsage.prepare:prepare_workdir",
           train="omnisage.train.omnisearchsage.trainer:train_and_evaluate",
           evaluate="omnisage.train.omnisearchsage.trainer:evaluate_checkpoint",
           export="omnisage.serving.omnisearchsage.export:export_bundle",
           serve="omnisage.serving.omnisearchsage.service:serve_config"),
    System("pintext",
           prepare="omnisage.data.pintext.pairs:prepare",
           train="omnisage.train.pintext.trainer:train",
           evaluate="omnisage.train.pintext.trainer:evaluate",
           export="omnisage.serving.pintext.export:export",
           serve=None, note="a PinText bundle is read in-process (models.pintext.TextEmbedder)"),
    System("twotower",
           prepare="omnisage.data.twotower.prepare:prepare",
           train="omnisage.train.twotower.trainer:train",
           evaluate="omnisage.train.twotower.trainer:evaluate",
           export="omnisage.serving.twotower.bundle:export",
           serve="omnisage.serving.twotower.service:serve_config"),
    System("pinnersage",
           prepare=None,
           train="omnisage.serving.pinnersage.batch:train",
           evaluate=None,
           export=None,
           serve=None,
           note="PinnerSage reads another system's item embeddings and an actions table; its "
                "`train` is the daily batch job, whose output directory is served by the "
                "two-tower service (serve config field `pinnersage`)"),
)}


def get_system(config_or_name) -> System:
  """The System of a config (its `system` field; OmniSearchSage when absent) or a name."""
  name = config_or_name if isinstance(config_or_name, str) else \
      config_or_name.get("system", "omnisearchsage")
  if name not in SYSTEMS:
    raise ValueError(f"config field system={name!r}: one of {', '.join(SYSTEMS)}")
  return SYSTEMS[name]




def system_of_bundle(path: str) -> System:
  """The System that wrote a serving bundle: its manifest's `system` (OmniSearchSage bundles,
  the first format, have none)."""
  import json
  import os
  manifest = os.path.join(path, "manifest.json")
  try:
    with open(manifest) as f:
      found = json.load(f)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"{manifest} not found: not a serving bundle (launch.py export)") \
        from error
  except (OSError, ValueError) as error:   # ValueError: bad JSON or bytes that are not UTF-8
    raise ValueError(f"{manifest}: not readable JSON ({error})") from error
  name = found.get("system", "omnisearchsage") if isinstance(found, dict) else None
  if name not in SYSTEMS:
    raise ValueError(f"{manifest}: unknown system {name!r}")
  return SYSTEMS[name]


__all__ = ["STEPS", "SYSTEMS", "System", "get_system", "system_of_bundle"]
