"""launch.py end to end on the tiny config: prepare -> train -> eval, each closing with a JSON line;
user mistakes get a one-line error, not a stack trace; training never imports TensorFlow."""

import os
import subprocess
import sys

from tests.helpers import ROOT, TINY_CONFIG, last_json, subprocess_env

TASKS = {"q2pin", "q2product", "q2query", "q2pinsage", "q2itemsage"}


def launch(*args, devices=None):
  cmd = [sys.executable, "launch.py", *args]
  return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(devices), capture_output=True, text=True,
                        timeout=900)


def test_prepare_train_eval(tmp_path):
  common = [f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}"]
  prepared = launch("prepare", *common)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  summary = last_json(prepared)["prepare"]
  assert summary["synthetic"] is True
  assert os.path.exists(tmp_path / "prepared" / "meta.json")
  assert sum(sum(r.values()) if isinstance(r, dict) else r
             for r in summary["bad_rows"].values()) > 0   # injected bad rows are counted
  assert "bad rows" in prepared.stdout

  trained = launch("train", *common, "--config.train.steps=12", devices=2)
  assert trained.returncode == 0, trained.stderr[-3000:]
  train = last_json(trained)["train"]
  assert train["steps"] == 12 and train["examples_per_second"] > 0
  assert set(train["recall@10"]) == TASKS

  evaluated = launch("eval", *common, devices=2)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = last_json(evaluated)["eval"]
  assert result["step"] == 12
  assert set(result["recall@10"]) == TASKS
  for task, r in result["recall@10"].items():
    assert 0.0 <= r["untrained"] <= 1.0 and 0.0 <= r["trained"] <= 1.0
  # The trained numbers of `eval` are those `train` measured on the same checkpoint.
  for task in TASKS:
    assert abs(result["recall@10"][task]["trained"] - train["recall@10"][task]) < 1e-6


def test_missing_prepared_data_is_a_clear_error(tmp_path):
  result = launch("train", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "launch.py prepare" in result.stderr
  assert "Traceback" not in result.stderr
  assert "error" in last_json(result)["train"]


def test_unknown_subcommand_is_a_usage_error(tmp_path):
  result = launch("fly", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "usage" in (result.stderr + result.stdout).lower()


def test_training_code_does_not_import_tensorflow():
  code = ("import sys, launch, omnisage.train.omnisearchsage.trainer, "
          "omnisage.train.omnisearchsage.step, omnisage.models, "
          "omnisage.data.omnisearchsage.pipeline, omnisage.data.omnisearchsage.prepare; "
          "print('tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "False"


def test_prepare_names_the_file_and_column_of_a_broken_input(tmp_path):
  import pyarrow.parquet as pq

  from omnisage.data.omnisearchsage import synthetic
  from tests.helpers import tiny_config
  config = tiny_config()
  raw = tmp_path / "raw"
  synthetic.generate(config.synthetic, config.seed, str(raw))
  table = pq.read_table(raw / "pins.parquet")
  pq.write_table(table.drop_columns(["pinsage"]), raw / "pins.parquet")
  result = launch("prepare", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}",
                  f"--config.data.raw_dir={raw}")
  assert result.returncode == 2
  assert "pins.parquet" in result.stderr and "pinsage" in result.stderr
  assert "Traceback" not in result.stderr
  pq.write_table(table, raw / "pins.parquet")   # mend it; now break another table
  (raw / "board_saves.parquet").unlink()
  result = launch("prepare", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}",
                  f"--config.data.raw_dir={raw}")
  assert result.returncode == 2 and "board_saves.parquet not found" in result.stderr


PINNERSAGE = os.path.join(ROOT, "configs", "pinnersage_movielens.py")


def test_a_step_a_system_lacks_is_a_clear_error(tmp_path):
  """omnisage/systems.py: PinnerSage has no prepare step; asking for it says why, exit 2."""
  result = launch("prepare", f"--config={PINNERSAGE}", f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "system 'pinnersage' has no prepare step" in result.stderr
  assert "Traceback" not in result.stderr
  assert "error" in last_json(result)["prepare"]


def test_pinnersage_train_needs_its_actions(tmp_path):
  result = launch("train", f"--config={PINNERSAGE}", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "config.actions is required" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_system_is_a_clear_error(tmp_path):
  result = launch("train", f"--config={TINY_CONFIG}:tiny", f"--workdir={tmp_path}",
                  "--config.system=nope")
  assert result.returncode == 2 and "system='nope'" in result.stderr
