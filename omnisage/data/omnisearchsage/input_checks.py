"""Raw inputs that cannot make a training set: prepare's errors.

`launch.py prepare` refuses, with a ValueError that names the table, its file and the task that
needs it (launch.py: exit 2, no traceback), a world it cannot train on, rather than writing empty
tables that `train` would fail on later: a needed table that is empty, or has no valid row, or a
log with no training row for a configured task. prepare's stages (ray_validate.py) raise them
through `InputChecks` on the driver, never inside a Ray task, so the messages reach launch.py as
they are.

A table is "needed" by the queries_log (every pair comes from it) and by each configured task
(`config.tasks.<task>` pairs per batch > 0; all tasks when the config has no `tasks`).

Usage:
  checks = InputChecks(config, raw_dir)
  checks.not_empty({"queries_log": 1200, "pins": 0, ...})   # ValueError: pins table ... is empty
"""

import os

from omnisage.data.omnisearchsage import schema


def needed_entities(config) -> dict:
  """Entity table -> the configured task that needs it (pairs per batch > 0; all without tasks)."""
  tasks = config.get("tasks") or {}
  return {schema.TASK_ENTITY[t]: t for t in ("q2pin", "q2product") if tasks.get(t, 1) > 0}


class InputChecks:
  """The errors of one prepare run, in the order prepare meets them."""

  def __init__(self, config, raw_dir: str):
    self.needed = needed_entities(config)
    self.where = {name: f"{name} table {os.path.join(raw_dir, name + '.parquet')}"
                  for name in schema.RAW_TABLES}
    self.why = {"queries_log": "prepare makes every pair from it",
                **{k: f"task {t} needs {k} (config.tasks.{t} > 0; set it to 0 for a world "
                      f"without {k})" for k, t in self.needed.items()}}

  def not_empty(self, raw_rows: dict) -> None:
    """Before validation: the log and every needed entity table have rows."""
    for name, reason in self.why.items():
      if not raw_rows[name]:
        raise ValueError(f"{self.where[name]} is empty (0 rows), but {reason}")

  def valid_entities(self, kind: str, valid: int, raw_rows: int, bad: dict) -> None:
    """After validating entity table `kind` (`bad`: its bad-row counts)."""
    if kind in self.needed and not valid:
      raise ValueError(f"{self.where[kind]} has no valid row (all {raw_rows} bad: {bad}), "
                       f"but {self.why[kind]}")

  def valid_log(self, valid: int, raw_rows: int, bad: dict) -> None:
    if not valid:
      raise ValueError(f"{self.where['queries_log']} has no valid row (all {raw_rows} "
                       f"bad: {bad})")

  def training_rows(self, train_kinds, bad: dict) -> None:
    """After the split: `train_kinds`, the entity kinds with a valid training log row."""
    for k in self.needed:  # else train finds no pairs to batch for the task
      if k not in train_kinds:
        raise ValueError(f"{self.where['queries_log']} has no valid training row engaging {k}, "
                         f"but {self.why[k]} (bad rows: {bad})")
