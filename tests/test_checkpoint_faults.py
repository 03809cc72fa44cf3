"""Damaged checkpoints and non-finite training never pass silently (omnisage/train/checkpoint.py,
omnisage/train/loop.py): fallback past a flipped or truncated checkpoint, a refusal when none is
intact, NaN steps stopped or skipped, evaluation that a NaN model cannot fool."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnisage.train.checkpoint import (
  CorruptCheckpointError,
  fingerprint,
  verify,
)
from omnisage.train.loop import NonFiniteError, Trainable, restore_for_eval, train_loop
from tests.helpers import TINY_CONFIG, common_flags, last_json, run_launch
from tests.test_loop import config, numpy_reference, trainable, weights


def data_files(ckpt_dir: str, step: int) -> list[str]:
  """The array data files of one checkpoint, largest first."""
  files = [f for f in glob.glob(os.path.join(ckpt_dir, str(step), "state", "**", "*"),
                                recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  assert files, os.listdir(os.path.join(ckpt_dir, str(step), "state"))
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(path: str, count: int = 12):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(count):
      pos = (len(data) // 2 + 7 * i) % len(data)
      data[pos] ^= 0xFF
    f.seek(0)
    f.write(data)


def truncate(path: str):
  with open(path, "r+b") as f:
    f.truncate(max(os.path.getsize(path) // 3, 1))


def test_fingerprint_sees_one_flipped_bit_and_nonfinite_values():
  state = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "step": jnp.int32(7),
           "h": jnp.ones((5,), jnp.bfloat16)}
  saved = fingerprint(state)
  verify(state, saved)   # intact
  bits = np.asarray(state["w"]).view(np.uint32).copy()
  bits[1, 2] ^= 1 << 9   # one bit of one float
  with pytest.raises(ValueError, match=r"\['w'\] differs"):
    verify({**state, "w": jnp.asarray(bits.view(np.float32))}, saved)
  swapped = np.asarray(state["w"]).copy()
  swapped[0, [0, 1]] = swapped[0, [1, 0]]   # same plain sum, different weighted sum
  with pytest.raises(ValueError, match="differs"):
    verify({**state, "w": jnp.asarray(swapped)}, saved)
  nan = {**state, "w": state["w"].at[0, 0].set(jnp.nan)}
  with pytest.raises(ValueError, match=r"\['w'\] holds 1 non-finite"):
    verify(nan, fingerprint(nan))   # a NaN saved as such is still refused


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [flip_bytes, truncate])
def test_damaged_newest_checkpoint_falls_back_and_is_rewritten(tmp_path, damage):
  work = str(tmp_path)
  train_loop(config(10), work, trainable())              # checkpoints 5 and 10
  for path in data_files(os.path.join(work, "checkpoints"), 10):
    damage(path)
  state, summary = train_loop(config(12), work, trainable())
  assert summary["resumed_from"] == 5                    # 10 refused, not trained on
  np.testing.assert_allclose(weights(state), numpy_reference(12), rtol=1e-4, atol=1e-5)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["10", "12", "5"]
  assert [d.split("-")[0] for d in os.listdir(os.path.join(work, "checkpoints_corrupt"))] == ["10"]
  assert restore_for_eval(config(12), work, trainable().state)[0] == 12


def test_no_intact_checkpoint_refuses_then_restarts_when_allowed(tmp_path):
  work = str(tmp_path)
  train_loop(config(10), work, trainable())
  for step in (5, 10):
    for path in data_files(os.path.join(work, "checkpoints"), step):
      truncate(path)
  with pytest.raises(CorruptCheckpointError, match="restart_if_corrupt=True"):
    train_loop(config(12), work, trainable())
  # Refusing moves nothing: a second try without the flag refuses again.
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["10", "5"]
  with pytest.raises(CorruptCheckpointError):
    restore_for_eval(config(12), work, trainable().state)   # eval/export say so too
  allowed = config(12)
  allowed.train.restart_if_corrupt = True
  state, summary = train_loop(allowed, work, trainable())
  assert summary["resumed_from"] is None and summary["steps"] == 12
  np.testing.assert_allclose(weights(state), numpy_reference(12), rtol=1e-4, atol=1e-5)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["10", "12", "5"]
  assert len(os.listdir(os.path.join(work, "checkpoints_corrupt"))) == 2


def nan_at(step_fn, bad_step: int):
  """A step function whose loss and update turn NaN at one step."""
  def step(statics, state, batch):
    new, metrics = step_fn(statics, state, batch)
    poison = jnp.where(state.step + 1 == bad_step, jnp.nan, 0.0)
    new = new.replace(params=jax.tree.map(lambda p: p + poison, new.params))
    return new, {**metrics, "loss": metrics["loss"] + poison}
  return step


def test_nonfinite_step_stops_the_run_before_it_is_checkpointed(tmp_path):
  run = trainable()
  run = Trainable(run.mesh, run.statics, run.state, nan_at(run.step_fn, 7), run.iterator,
                  run.examples_per_step)
  with pytest.raises(NonFiniteError, match=r"step 7: non-finite training metrics \(loss"):
    train_loop(config(10), str(tmp_path), run)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]   # nothing at or after 7


def test_nonfinite_step_skipped_when_configured(tmp_path):
  run = trainable()
  run = Trainable(run.mesh, run.statics, run.state, nan_at(run.step_fn, 7), run.iterator,
                  run.examples_per_step)
  skip = config(10)
  skip.train.nonfinite = "skip"
  state, summary = train_loop(skip, str(tmp_path), run)
  assert summary["skipped_updates"] == 1 and summary["steps"] == 10
  assert np.all(np.isfinite(weights(state)))
  assert int(state.step) == 10


def test_launch_train_with_every_checkpoint_corrupt_exits_2(tiny_prepared, tmp_path):
  """The issue's case on the tiny config: every kept checkpoint damaged -> exit 2 naming the
  flag, a valid JSON line; with the flag, a fresh run that writes new checkpoints."""
  _, prepared = tiny_prepared
  flags = common_flags(tmp_path, prepared)
  first = run_launch("train", *flags, "--config.train.steps=10")
  assert first.returncode == 0, first.stderr[-3000:]
  ckpts = os.path.join(tmp_path, "checkpoints")
  for step in os.listdir(ckpts):
    flip_bytes(data_files(ckpts, int(step))[0], count=64)
  refused = run_launch("train", *flags, "--config.train.steps=12")
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "--config.train.restart_if_corrupt=True" in refused.stderr
  assert "Traceback" not in refused.stderr and "Event loop is closed" not in refused.stderr
  assert "error" in json.loads(refused.stdout.strip().splitlines()[-1])["train"]
  restarted = run_launch("train", *flags, "--config.train.steps=12",
                         "--config.train.restart_if_corrupt=True")
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  summary = last_json(restarted)["train"]
  assert summary["resumed_from"] is None and np.isfinite(summary["final_loss"])
  assert "12" in os.listdir(ckpts)
  assert TINY_CONFIG   # the tiny OmniSearchSage config of common_flags
