"""PinText (SPEC §2): hinge loss vs NumPy, averaging, sharding, end-to-end, resume, kNN.

All but the last test run on the tiny synthetic topic world (configs/pintext.py:tiny), so they
always run; the real-data checks skip when ../shared/datasets is absent.
"""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pintext as pintext_config
from omnisage.data.pintext import pairs as pintext_pairs
from omnisage.models.pintext import PinText, TextEmbedder, average
from omnisage.train import margin_loss, sharding
from omnisage.train.evaluators.pintext import knn_loo_precision_at_1
from tests.helpers import ROOT, last_json, run_launch, subprocess_env

CONFIG = os.path.join(ROOT, "configs", "pintext.py")
DATASETS = os.environ.get("OMNISAGE_DATASETS", os.path.join(ROOT, "..", "shared", "datasets"))


def tiny_config():
  return pintext_config.get_config("tiny")


# --- the hinge loss against NumPy ---------------------------------------------------------------
def _np_cos(a, b):
  n = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  return np.where(n > 0, np.sum(a * b, axis=-1) / np.maximum(n, 1e-8), 0.0)


def _np_hinge(q, p, n, margin, mask):
  rho = n.shape[1]
  total = 0.0
  for i in range(len(q)):
    pos = _np_cos(q[i], p[i])
    for j in range(rho):
      if mask[i, j]:
        total += max(0.0, margin - pos + _np_cos(q[i], n[i, j])) / rho
  return total / len(q)


def test_hinge_loss_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  q, p = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  n = rng.normal(size=(5, 3, 4))
  n[0, 0] = 0.0           # an entity without known words: cos 0, no NaN
  mask = rng.random((5, 3)) > 0.2
  for margin in (0.0, 0.3, 1.5):
    loss, metrics = margin_loss.hinge_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), margin,
                                           jnp.asarray(mask))
    assert np.isclose(float(loss), _np_hinge(q, p, n, margin, mask), rtol=1e-5, atol=1e-6)
    assert 0.0 <= float(metrics["active"]) <= 1.0
  # Gradient w.r.t. q against central finite differences of the NumPy reference.
  grad = np.asarray(jax.grad(lambda x: margin_loss.hinge_loss(
      x, jnp.asarray(p), jnp.asarray(n), 0.3, jnp.asarray(mask))[0])(jnp.asarray(q)))
  eps, numeric = 1e-4, np.zeros_like(q)
  for idx in np.ndindex(q.shape):
    hi, lo = q.copy(), q.copy()
    hi[idx] += eps
    lo[idx] -= eps
    numeric[idx] = (_np_hinge(hi, p, n, 0.3, mask) - _np_hinge(lo, p, n, 0.3, mask)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=2e-3)
  assert np.abs(grad).sum() > 0
  # A margin so negative that nothing is inside it: no loss, no gradient.
  loss, metrics = margin_loss.hinge_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(n), -5.0)
  assert float(loss) == 0.0 and float(metrics["active"]) == 0.0


def test_rho_negatives_and_accidental_hits():
  q = jnp.asarray([[1.0, 0.0]])
  p = jnp.asarray([[1.0, 0.0]])
  n = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])   # rho = 4
  # terms: max(0, .5 - 1 + 1) = .5, max(0, .5 - 1 + 0) = 0, .5, 0 -> (.5 + .5) / 4
  loss, _ = margin_loss.hinge_loss(q, p, n, 0.5)
  assert np.isclose(float(loss), 0.25)
  # The masked negative (an accidental hit) no longer counts, still divided by rho.
  loss, _ = margin_loss.hinge_loss(q, p, n, 0.5, jnp.asarray([[False, True, True, True]]))
  assert np.isclose(float(loss), 0.125)


def test_norm_radius_projection():
  table = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], np.float32)
  out = np.asarray(margin_loss.project_to_ball(jnp.asarray(table), 1.0))
  expected = table / np.maximum(1.0, np.linalg.norm(table, axis=1, keepdims=True))
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert np.all(np.linalg.norm(out, axis=1) <= 1.0 + 1e-6)
  np.testing.assert_array_equal(np.asarray(margin_loss.project_to_ball(jnp.asarray(table), 0.0)),
                                table)


# --- averaging --------------------------------------------------------------------------------
def test_average_ignores_padding_and_oov():
  table = np.arange(12, dtype=np.float32).reshape(6, 2)   # row 0 = padding
  ids = np.array([[1, 3, 0, 0], [0, 0, 0, 0], [5, 5, 2, 0]], np.int32)
  out = np.asarray(average(jnp.asarray(table), jnp.asarray(ids)))
  np.testing.assert_allclose(out, [(table[1] + table[3]) / 2, [0, 0],
                                   (2 * table[5] + table[2]) / 3])
  # The model declares its table P("model", None): it is built under a (here 1x1) mesh.
  mesh = sharding.make_mesh(types.SimpleNamespace(data=1, model=1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    model = PinText(6, 2, 0.1, rngs=nnx.Rngs(0))
    model.table[...] = jnp.asarray(table)
    np.testing.assert_allclose(np.asarray(model.embed(jnp.asarray(ids))), out)
  # The serving side: unknown words dropped, case and punctuation normalised, no word -> zero.
  vocab = ["[PAD]", "red", "sofa", "bed", "lamp", "chair"]
  emb = TextEmbedder(vocab, table)
  got = emb.embed(["Red, BED!", "zzz qqq", "chair chair sofa xyz"])
  np.testing.assert_allclose(got, out)
  cov = emb.coverage(["Red, BED!", "zzz qqq", "chair chair sofa xyz"])
  assert (cov["tokens"], cov["known"], cov["texts_without_known_word"]) == (8, 5, 1)


# --- kNN leave-one-out ----------------------------------------------------------------------
def test_knn_leave_one_out_precision_by_hand():
  vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05], [0.0, 0.0]])
  labels = ["a", "a", "b", "a", "c", "d"]
  out = knn_loo_precision_at_1(vectors, labels)
  # nearest: 0->1 (a, hit), 1->0 (hit), 2->3 (a != b), 3->2 (b != a), 4->? cosines with 4:
  # 0: -1.0, 1: -0.99.., 2: 0.05, 3: ~0.04 -> 2 (b != c); 5 is zero: every score 0, ties -> 0
  # (a != d). Hits 2 of 6; answerable = the class-"a" rows 0, 1, 3: 2 of 3.
  np.testing.assert_array_equal(out["nearest"], [1, 0, 3, 2, 2, 0])
  assert out["precision@1"] == round(2 / 6, 4)
  assert out["answerable"] == 3 and out["precision@1_answerable"] == round(2 / 3, 4)


# --- sharding -------------------------------------------------------------------------------
_CHILD = r"""
import functools, json, sys
import jax, numpy as np
from configs import pintext as pc
from omnisage.data.pintext import pairs
from omnisage.data.pintext.pipeline import load_catalogues, train_iterator
from omnisage.train import sharding
from omnisage.train.pintext import trainer as pintext
config = pc.get_config("tiny")
prepared = sys.argv[1]
catalogues = load_catalogues(config, prepared)
batch = next(train_iterator(config, prepared, catalogues))
vocab = len(pairs.read_vocab(prepared))
out, ref = {}, None
for data, model in [(1, 1), (2, 4), (8, 1)]:
  config.mesh.data, config.mesh.model = data, model
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: data * model])
  state, statics = pintext.create_pintext_state(config, vocab, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(functools.partial(pintext.train_step, config=config,
                                   optimizer=pintext.make_optimizer(config)),
                 in_shardings=(None, shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  new, metrics = step(statics, state, sharding.shard_batch(mesh, batch))
  table = jax.tree.leaves(new.params)[0]
  arr = np.asarray(table)
  ref = arr if ref is None else ref
  out[f"{data}x{model}"] = dict(loss=float(metrics["loss"]), spec=str(table.sharding.spec),
      shard_rows=table.addressable_shards[0].data.shape[0], rows=table.shape[0],
      max_diff=float(np.max(np.abs(arr - ref))))
print(json.dumps(out))
"""


def test_dictionary_sharded_on_8_devices(tmp_path):
  config = tiny_config()
  pintext_pairs.prepare(config, str(tmp_path))
  result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "prepared")], cwd=ROOT,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  one = out["1x1"]
  assert out["2x4"]["spec"] in ("P('model', None)", "PartitionSpec('model', None)")
  assert out["2x4"]["shard_rows"] == one["rows"] // 4
  assert out["8x1"]["shard_rows"] == one["rows"]
  for mesh in ("2x4", "8x1"):   # the same update whatever the layout
    assert abs(out[mesh]["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), out
    assert out[mesh]["max_diff"] <= 1e-5, out


# --- end to end through launch.py and exact resume ---------------------------------------------
def test_launch_prepare_train_eval_export(tmp_path):
  flags = [f"--config={CONFIG}:tiny", f"--workdir={tmp_path}"]
  prepared = run_launch("prepare", *flags)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  meta = last_json(prepared)["prepare"]
  assert meta["vocab"] > 0 and set(meta["tasks"]) == {"homedepot", "bestbuy", "movielens"}
  trained = run_launch("train", *flags)
  assert trained.returncode == 0, trained.stderr[-3000:]
  train = last_json(trained)["train"]
  assert train["steps"] == 60 and np.isfinite(train["final_loss"])
  evaluated = run_launch("eval", *flags)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "WANDS kNN" in evaluated.stdout
  ev = last_json(evaluated)["eval"]
  # Training helps on the topic world: validation ranking and kNN beat the random init.
  assert ev["trained"]["validation"]["mean_recall@10"] > ev["random"]["validation"][
      "mean_recall@10"]
  assert ev["trained"]["wands"]["precision@1"] >= ev["random"]["wands"]["precision@1"]
  assert ev["trained"]["wands"]["coverage"] == 1.0
  bundle = tmp_path / "bundle"
  exported = run_launch("export", *flags, f"--out={bundle}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  emb = TextEmbedder.load(str(bundle))
  assert emb.manifest["step"] == 60 and emb.embed(["t0w1 t0w2"]).shape == (1, 16)
  # A damaged bundle is refused, naming the file.
  with open(bundle / "vectors.npy", "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match="vectors.npy"):
    TextEmbedder.load(str(bundle))


def test_resume_is_exact(tmp_path):
  from omnisage.train.pintext import trainer as pintext
  config = tiny_config()
  config.train.steps, config.train.checkpoint_every = 30, 10
  config.train.async_checkpoint = False
  pintext_pairs.prepare(config, str(tmp_path / "a"))
  config.data.prepared_dir = str(tmp_path / "a" / "prepared")
  straight = pintext.train(config, str(tmp_path / "a"))
  config.train.steps = 20
  pintext.train(config, str(tmp_path / "b"))
  config.train.steps = 30
  resumed = pintext.train(config, str(tmp_path / "b"))
  assert resumed["resumed_from"] == 20 and resumed["steps"] == 30
  a = pintext.latest_table(config, str(tmp_path / "a"))[2]
  b = pintext.latest_table(config, str(tmp_path / "b"))[2]
  np.testing.assert_array_equal(a, b)
  assert resumed["final_loss"] == straight["final_loss"]


# --- real data ------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(os.path.join(DATASETS, "wands")), reason="no datasets")
def test_real_sources_have_no_test_queries_and_wands_drops_six(tmp_path):
  from omnisage.data.pintext import pairs as pintext_pairs
  from omnisage.data.sources import homedepot
  task, _ = pintext_pairs.load_task("homedepot", DATASETS)
  queries = {q for split in task.pairs.values() for q, _ in split}
  hd = homedepot.load(os.path.join(DATASETS, "homedepot-search-relevance"))
  # Exactly the training (non-test) queries with a positive, normalised: no test query entered.
  assert queries == {pintext_pairs.text.normalize(q) for q in hd.positives(test=False)}
  wq, wc, bad = pintext_pairs.load_wands(DATASETS)
  assert len(wq) == 474 and bad["total"] == 6 and len(set(wc)) == 188
