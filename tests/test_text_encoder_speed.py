"""Correctness of SentenceEncoder's fast paths (omnisage/baselines/text_encoder.py): packing several
texts into a row, deduplication and the fused attention projection give each text the embedding the
unpacked query tower gives it (no timing asserts: benchmarks/vs_sentence_transformers.py times)."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnisage.baselines.text_encoder import SentenceEncoder, pack_rows
from omnisage.models.compat import l2_normalize
from tests.helpers import ROOT, minilm_checkpoint, subprocess_env

TEXTS = ["angle bracket", "l bracket", "", "cordless drill 18v lithium-ion with 2 batteries",
         "angle bracket", "Café crème façade", "x" * 40, "a", "stainless steel 1/2 in. hex nut",
         "behr premium plus ultra 1 gal. satin enamel interior paint and primer in one"]


@pytest.fixture(scope="module")
def encoder():
  # Skips without the checkpoint package; a checkpoint that fails to load fails the tests.
  return SentenceEncoder(minilm_checkpoint(), batch_size=2)   # 32 token slots: several batches


def test_pack_rows_is_a_partition_within_width():
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 33, size=500)
  rows = pack_rows(lengths, 32)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(lengths[row].sum() <= 32 for row in rows)
  # Best-fit decreasing is within 11/9 OPT + 1 rows; the volume bound is a weaker check of that.
  assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 32) + 1


def test_packed_equals_unpacked_tower(encoder):
  # Reference: the query tower itself, one text per row, zero-padded (no packing, no fusion).
  from omnisage.models.hf_import import load_hf_checkpoint
  tower = load_hf_checkpoint(minilm_checkpoint(), embed_dim=8, rngs=nnx.Rngs(0))
  tokens = encoder.tokenizer.encode_batch(TEXTS, 64)
  want = np.asarray(l2_normalize(tower.mean_pooled(jnp.asarray(tokens))))
  got = encoder.encode(TEXTS)
  assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[0], got[4])   # a duplicate is encoded once
  # Order and batch composition do not matter: each text alone gives the same vector.
  alone = np.stack([encoder.encode([t])[0] for t in TEXTS[:4]])
  np.testing.assert_allclose(alone, want[:4], atol=1e-5)


def test_rejects_non_strings(encoder):
  with pytest.raises(TypeError):
    encoder.encode(["ok", 3])


_TWO_DEVICES = """
import json, sys
import jax, numpy as np
from omnisage.baselines.text_encoder import SentenceEncoder, minilm_dir
texts = json.loads(sys.argv[1])
both = SentenceEncoder(minilm_dir(), batch_size=2)
one = SentenceEncoder(minilm_dir(), batch_size=2, devices=jax.devices()[:1])
used, fn = [], both._fn
def spy(params, *args, **kw):
  used.append(next(iter(jax.tree.leaves(params)[0].devices())).id)
  return fn(params, *args, **kw)
both._fn = spy
diff = float(np.abs(both.encode(texts) - one.encode(texts)).max())
print(json.dumps({"devices": len(both.devices), "used": used, "max_diff": diff}))
"""


def test_batches_dealt_over_devices_give_the_same_vectors(encoder):
  # Texts of one length as well: which device takes a batch must not depend on its texts.
  texts = TEXTS * 3 + [f"bracket {c}" for c in "abcdefghijklmnopqrstuvwxyz"]
  out = subprocess.run([sys.executable, "-c", _TWO_DEVICES, json.dumps(texts)], cwd=ROOT,
                       env=subprocess_env(2), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 2
  # Several batches, taken by the two devices in turn.
  assert len(result["used"]) >= 3 and result["used"] == [
    i % 2 for i in range(len(result["used"]))], result
  assert result["max_diff"] <= 1e-6, result
