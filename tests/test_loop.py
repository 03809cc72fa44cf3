"""The shared training loop (omnisage/train/loop.py) on a toy system: least squares with a
Grain pipeline, checked against a NumPy loop of the same SGD updates, with resume, evaluation
hooks and the progress bar."""

import functools
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from omnisage.train import sharding
from omnisage.train.loop import Trainable, restore_for_eval, train_loop
from omnisage.train.state import create_state

DIM, BATCH, LR = 4, 8, 0.1
W_TRUE = np.arange(1, DIM + 1, dtype=np.float32)


class Linear(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.zeros((DIM,), jnp.float32))

  def __call__(self, x):
    return x @ self.w[...]


def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, DIM)).astype(np.float32)
  return x, x @ W_TRUE


class Rows:
  def __init__(self):
    self.x, self.y = data()

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {"x": self.x[i], "y": self.y[i]}


def iterator():
  ds = grain.MapDataset.source(Rows()).seed(3).shuffle().repeat().batch(BATCH)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def step_fn(statics, state, batch, *, optimizer):
  def loss_fn(params):
    err = statics.model(params)(batch["x"]) - batch["y"]
    return jnp.mean(err ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), {"loss": loss}


def config(steps, checkpoint_every=5, eval_every=0):
  c = ml_collections.ConfigDict()
  c.train = dict(steps=steps, log_every=2, checkpoint_every=checkpoint_every, keep_checkpoints=5,
                 async_checkpoint=False, eval_every=eval_every)
  return c


def trainable(evaluate=None):
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "model": 1}),
                            jax.devices()[:1])
  optimizer = optax.sgd(LR)
  state, statics = create_state(Linear, optimizer, mesh, seed=0)
  return Trainable(mesh, statics, state, functools.partial(step_fn, optimizer=optimizer),
                   iterator(), examples_per_step=BATCH, evaluate=evaluate)


def numpy_reference(steps: int) -> np.ndarray:
  """The same SGD updates on the same batches, in NumPy."""
  w, it = np.zeros(DIM, np.float64), iterator()
  for _ in range(steps):
    b = next(it)
    x, y = b["x"].astype(np.float64), b["y"].astype(np.float64)
    w -= LR * 2 * x.T @ (x @ w - y) / len(y)
  return w


def weights(state) -> np.ndarray:
  return np.asarray(jax.tree.leaves(state.params)[0])


def test_trains_like_the_numpy_loop_and_logs(tmp_path):
  state, summary = train_loop(config(10), str(tmp_path), trainable())
  np.testing.assert_allclose(weights(state), numpy_reference(10), rtol=1e-4, atol=1e-5)
  assert summary["steps"] == 10 and summary["resumed_from"] is None
  assert np.isfinite(summary["final_loss"]) and summary["examples_per_second"] > 0
  with open(tmp_path / "train_metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == [2, 4, 6, 8, 10]
  assert logged[-1]["loss"] < logged[0]["loss"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def test_resume_continues_exactly(tmp_path):
  straight, _ = train_loop(config(10), str(tmp_path / "a"), trainable())
  train_loop(config(5), str(tmp_path / "b"), trainable())          # stops at 5, checkpointed
  resumed, summary = train_loop(config(10), str(tmp_path / "b"), trainable())
  assert summary["resumed_from"] == 5
  np.testing.assert_array_equal(weights(resumed), weights(straight))
  step, restored = restore_for_eval(config(10), str(tmp_path / "b"), trainable().state)
  assert step == 10
  np.testing.assert_array_equal(weights(restored), weights(straight))


def test_evaluation_runs_at_start_every_n_steps_and_at_the_end(tmp_path):
  seen = []

  def evaluate(state):
    seen.append(int(state.step))
    return {"w0": float(weights(state)[0])}

  _, summary = train_loop(config(6, eval_every=4), str(tmp_path), trainable(evaluate))
  assert seen == [0, 4, 6]
  assert summary["evaluations"]["untrained"] == {"w0": 0.0}
  assert summary["evaluations"]["final"]["w0"] != 0.0


def test_progress_bar_shows_step_total_loss_and_rate(tmp_path, capsys):
  train_loop(config(4), str(tmp_path), trainable(), progress=True)
  err = capsys.readouterr().err
  assert "4/4" in err and "loss=" in err and "rate=" in err


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    restore_for_eval(config(1), str(tmp_path), trainable().state)


def test_selected_checkpoint_is_what_eval_restores_until_training_resumes(tmp_path):
  from omnisage.train.checkpoint import SELECTED, select_checkpoint
  work = str(tmp_path)
  train_loop(config(10), work, trainable())
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 10   # resolved config
  select_checkpoint(work, 5, metric="validation recall@10", value=0.5)
  step, state = restore_for_eval(config(10), work, trainable().state)
  assert step == 5
  np.testing.assert_allclose(weights(state), numpy_reference(5), rtol=1e-4, atol=1e-5)
  train_loop(config(12), work, trainable())   # more training: the selection no longer holds
  assert not (tmp_path / SELECTED).exists()
  assert restore_for_eval(config(12), work, trainable().state)[0] == 12
  select_checkpoint(work, 3)   # a step that is not there is a clear error, not the newest
  with pytest.raises(FileNotFoundError, match="selects step 3"):
    restore_for_eval(config(12), work, trainable().state)
