"""The two-tower model on the per-user protocol: examples without leakage (vs a loop), the
attention user tower, random negatives, the protocol evaluator against user_metrics of NumPy dot
products, the attention model's bundle, and benchmarks/twotower_movielens.py on a slice of the
real MovieLens (skipped without it)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import twotower_movielens
from omnisage.data.sources import movielens
from omnisage.data.twotower import examples as mlx
from omnisage.data.twotower import user_protocol
from omnisage.data.twotower.prepare import prepare
from omnisage.data.user_split import per_user_split
from omnisage.models.twotower import USER_INPUTS
from omnisage.serving.twotower import bundle as tt_bundle
from omnisage.train.evaluators.user_retrieval import user_metrics
from omnisage.train.loop import restore_for_eval
from omnisage.train.twotower import trainer
from omnisage.train.twotower.protocol import ProtocolEvaluator
from tests.helpers import ROOT, subprocess_env
from tests.test_twotower import write_movielens

ML = os.path.join(os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared",
                                                                   "datasets")),
                  "movielens-latest-small")


def per_user_config(folder, stage="test", encoder="attention"):
  config = twotower_movielens.get_config("per_user_tiny")
  config.data.movielens_dir = str(folder)
  config.data.stage = stage
  config.model.user_encoder = encoder
  config.loss.random_negatives = 16
  return config


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
  """(config, workdir) of the tiny attention model trained on the synthetic folder's test stage."""
  root = tmp_path_factory.mktemp("tt_protocol")
  write_movielens(root / "ml")
  config = per_user_config(root / "ml")
  workdir = str(root / "run")
  prepare(config, workdir)
  seen = []
  summary = trainer.train(config, workdir, evaluate=lambda statics, params, step: (
      seen.append(step), {})[1])
  assert summary["steps"] == config.train.steps and np.isfinite(summary["final_loss"])
  assert seen == [0, 4, 8]   # fresh run, every eval_every, the end
  return config, workdir


@pytest.mark.parametrize("window", [0, 3])
def test_examples_vs_loop(tmp_path, window):
  write_movielens(tmp_path / "ml", num_users=12, per_user=10)
  ml = movielens.load(str(tmp_path / "ml"))
  r = ml.ratings
  users, items, ts = (r[c].to_numpy() for c in ("user", "movie", "timestamp"))
  split = user_protocol.stage_split(users, items, ts, "validation", 0.2)
  full = per_user_split(users, items, ts, 0.2)
  index_of = {int(m): i + 1 for i, m in enumerate(ml.movies["movie"].to_numpy())}
  train, evals = user_protocol.build_user_examples(split, index_of, history_len=8,
                                                   future_window=window, seed=3)
  assert len(train["item"]) == sum(len(h) for h in split.history.values())
  for row, user in enumerate(evals["user"]):
    history = [index_of[int(m)] for m in split.history[user]]
    times = split.history_times[user].tolist()
    # Nothing of the validation or test items reaches the user's features or the examples.
    held_out = {index_of[int(m)] for m in split.test[user]} | \
        {index_of[int(m)] for m in full.test[user]}
    assert set(evals["positives"][row]) == {index_of[int(m)] for m in split.test[user]}
    assert evals["seen"][row] == sorted(set(history))
    assert not held_out & set(np.asarray(evals["hist_items"][row]).tolist())
    mine = [i for i, u in enumerate(train["user"]) if u == user]
    assert [train["item"][i] for i in mine] == history   # one example per history item
    for j, i in enumerate(mine):
      hist, ages = np.asarray(train["hist_items"][i]), np.asarray(train["hist_age"][i])
      got = hist[hist != 0].tolist()
      # The request is made at engagement k, at most `window` engagements before the target j;
      # the history is every engagement strictly before t_k, most recent first.
      def history_at(k):
        return [h for h, t in zip(history[:k], times[:k]) if t < times[k]][::-1][:8]
      options = [history_at(k) for k in range(max(0, j - window), j + 1)]
      assert got in options and not held_out & set(got)
      if window == 0:
        assert got == history_at(j)
      assert (ages[hist != 0] > 0).all()


def test_attention_tower_units_and_padding(attention_run):
  config, workdir = attention_run
  run, state, statics, _ = trainer.setup(config, workdir)
  _, trained = restore_for_eval(config, workdir, state)
  model = statics.model(trained.params)
  users = mlx.load_eval_users(run.prepared)
  inputs = run.catalogue.user_inputs(users["hist_items"][:4], users["hist_age"][:4],
                                     users["user_dense"][:4])
  u = np.asarray(model.user_tower(*(inputs[k] for k in USER_INPUTS)))
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
  # Padding slots carry no information: changing their ages and genres changes nothing.
  noisy = {k: np.array(v) for k, v in inputs.items()}
  pad = noisy["hist_items"] == 0
  assert pad.any()
  noisy["hist_age"][pad] = 123.0
  noisy["hist_genres"][pad] = 1.0
  np.testing.assert_allclose(np.asarray(model.user_tower(*(noisy[k] for k in USER_INPUTS))), u,
                             atol=1e-5)
  empty = {k: np.zeros_like(v[:1]) for k, v in inputs.items()}   # no history at all
  assert np.isfinite(np.asarray(model.user_tower(*(empty[k] for k in USER_INPUTS)))).all()


def test_random_negatives_are_uniform_catalogue_rows():
  items = {"item": np.arange(11, dtype=np.int32), "item_year": np.arange(11, dtype=np.int32) * 2}
  out = trainer.random_negatives(jax.random.PRNGKey(0), items, 500)
  assert out["item"].min() >= 1 and out["item"].max() <= 10   # row 0 is padding
  np.testing.assert_array_equal(out["item_year"], out["item"] * 2)
  np.testing.assert_allclose(out["log_q"], np.log(500 / 10))
  assert len(np.unique(out["item"])) == 10


def test_protocol_evaluator_vs_numpy(attention_run):
  config, workdir = attention_run
  run, state, statics, _ = trainer.setup(config, workdir)
  _, trained = restore_for_eval(config, workdir, state)
  candidates = np.arange(2, run.catalogue.size + 1, 2)   # every other item
  ev = ProtocolEvaluator(run.prepared, run.catalogue, candidates, ks=(5, 10))
  model = statics.model(trained.params)
  cat, users = run.catalogue, ev.users
  v = np.asarray(model.item_tower(**{k: x for k, x in cat.item_inputs(candidates).items()}))
  inputs = cat.user_inputs(users["hist_items"], users["hist_age"], users["user_dense"])
  u = np.asarray(model.user_tower(*(inputs[k] for k in USER_INPUTS)))
  column = {int(c): j for j, c in enumerate(candidates)}
  keep = [r for r, p in enumerate(users["positives"]) if any(i in column for i in p)]
  want = user_metrics(u[keep] @ v.T,
                      [[column[i] for i in users["seen"][r] if i in column] for r in keep],
                      [[column[i] for i in users["positives"][r] if i in column] for r in keep],
                      ks=(5, 10))
  got = ev.run(statics, trained.params)
  assert got["users"] == len(keep) > 0
  for key in ("recall@5", "recall@10", "ndcg@10", "recall@10_se"):
    assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_attention_bundle_serves_the_same_vectors(attention_run, tmp_path):
  config, workdir = attention_run
  bundle = str(tmp_path / "bundle")
  tt_bundle.export(config, workdir, bundle)
  tt = tt_bundle.load_twotower_bundle(bundle)
  run, state, statics, _ = trainer.setup(config, workdir)
  _, trained = restore_for_eval(config, workdir, state)
  users = mlx.load_eval_users(run.prepared)
  inputs = run.catalogue.user_inputs(users["hist_items"][:3], users["hist_age"][:3],
                                     users["user_dense"][:3])
  direct = np.asarray(statics.model(trained.params).user_tower(*(inputs[k] for k in USER_INPUTS)))
  np.testing.assert_allclose(tt.embed_users(*(inputs[k] for k in USER_INPUTS)), direct, atol=1e-5)


@pytest.mark.skipif(not os.path.isdir(ML), reason=f"{ML} not found (../shared/datasets)")
def test_benchmark_on_a_slice(tmp_path):
  result = subprocess.run(
      [sys.executable, "benchmarks/twotower_movielens.py", f"--movielens={ML}",
       f"--workdir={tmp_path}", "--max-users=40", "--tiny", "--steps=8", "--eval-every=4",
       "--ease-lambdas=20,500", "--encoders=pool,attention"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])["twotower"]
  assert out["users"] == 40
  methods = out["methods"]
  assert set(methods) == {"two_tower", "popularity", "popularity_recent", "item_knn", "ease"}
  for m in methods.values():
    for k in ("recall@10", "recall@50", "recall@100", "ndcg@10"):
      assert 0.0 <= m[k] <= 1.0 and m[f"{k}_se"] >= 0.0
    assert m["recall@10"] <= m["recall@50"] <= m["recall@100"]
  chosen = out["two_tower"]
  assert chosen["encoder"] in ("pool", "attention")
  assert set(chosen["validation"]) == {"pool", "attention"}
  assert all(set(curve) == {"4", "8"} for curve in chosen["validation"].values())
  assert chosen["test_steps"] >= 1
