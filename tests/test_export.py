"""`launch.py export` end to end (SPEC §1 "Serving"): train the tiny config briefly, export a
bundle, serve it from a process that imports no model code, and compare with the model itself; a
damaged, newer-format or inconsistent bundle is refused before anything runs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, common_flags, last_json, run_launch, subprocess_env

BATCHES = (1, 3, 17)
# Input widths per batch size: exactly the bundle's length, shorter (padded) and longer (cropped).
QUERY_WIDTH = {1: 16, 3: 12, 17: 20}
ENTITY_WIDTH = {1: 192, 3: 100, 17: 200}

# Runs in its own interpreter so that sys.modules shows what serving really imports.
SERVE = """
import json, sys
import numpy as np
from omnisage.serving.bundle.loader import load_bundle
bundle_dir, inputs, outputs = sys.argv[1:4]
bundle = load_bundle(bundle_dir)
data = np.load(inputs)
out = {}
for n in %r:
  out[f"q{n}"] = bundle.embed_queries(data[f"q{n}"])
  out[f"e{n}"] = bundle.embed_entities(data[f"t{n}"], data[f"f{n}"], data[f"c{n}"])
np.savez(outputs, **out)
leaked = [m for m in ("omnisage.models", "omnisage.train", "flax") if m in sys.modules]
print(json.dumps({"leaked": leaked, "step": bundle.step}))
""" % (BATCHES,)


launch = run_launch


@pytest.fixture
def exported(tiny_bundle):
  """The session's tiny bundle (trained 6 steps, exported once for all serving tests)."""
  return tiny_bundle


def make_inputs(config, prepared, seed=0) -> dict:
  with open(os.path.join(prepared, "meta.json")) as f:
    vocab = json.load(f)["vocab"]
  rng = np.random.default_rng(seed)

  def ragged(batch, width, high):
    lengths = rng.integers(1, width + 1, size=batch)
    ids = rng.integers(1, high, size=(batch, width))
    return np.where(np.arange(width) < lengths[:, None], ids, 0).astype(np.int32)

  inputs = {}
  for n in BATCHES:
    inputs[f"q{n}"] = ragged(n, QUERY_WIDTH[n], vocab["query"])
    tokens = ragged(n, ENTITY_WIDTH[n], vocab["V"])
    inputs[f"t{n}"] = tokens
    fields = rng.integers(0, 8, size=tokens.shape)
    inputs[f"f{n}"] = np.where(tokens > 0, fields, 0).astype(np.int32)
    continuous = rng.normal(size=(n, 1536)).astype(np.float32)
    continuous[::2, :512] = 0.0   # entities without PinSage/ItemSage vectors
    inputs[f"c{n}"] = continuous
  return inputs


def reference_outputs(config, prepared, workdir, inputs) -> dict:
  """The model's own embeddings from the same checkpoint, computed with the training code."""
  from omnisage.data.omnisearchsage.schema import vocab_sizes_of
  from omnisage.train import sharding
  from omnisage.train.checkpoint import Checkpointer
  from omnisage.train.omnisearchsage.state import create_train_state
  from omnisage.train.state import abstract_state
  state, statics = create_train_state(config, vocab_sizes_of(prepared),
                                      sharding.make_mesh(config.mesh))
  step, trained, _ = Checkpointer(workdir).restore_latest(abstract_state(state))
  assert step == 6
  model = statics.model(trained.params)
  fit = lambda x, n: np.pad(x, ((0, 0), (0, max(n - x.shape[1], 0))))[:, :n]
  out = {}
  for n in BATCHES:
    out[f"q{n}"] = np.asarray(model.query_tower(fit(inputs[f"q{n}"], 16)))
    out[f"e{n}"] = np.asarray(model.entity_tower(fit(inputs[f"t{n}"], 192),
                                                 fit(inputs[f"f{n}"], 192), inputs[f"c{n}"]))
  return out


def test_bundle_serves_the_models_embeddings_without_model_code(exported, tmp_path):
  config, prepared, workdir, bundle, summary = exported
  assert summary["step"] == 6 and summary["bundle"] == bundle
  assert summary["dims"]["query_len"] == 16 and summary["dims"]["entity_tokens"] == 192
  for name in ("manifest.json", "params.safetensors", "query_tower.jaxexport",
               "entity_tower.jaxexport", "query_vocab.txt"):
    assert os.path.exists(os.path.join(bundle, name)), name
  assert summary["files"]["params.safetensors"] > 0
  assert any(name.startswith("ngram_vocab/") for name in summary["files"])
  with open(os.path.join(bundle, "manifest.json")) as f:
    tokenizer = json.load(f)["tokenizer"]
  assert tokenizer == {"kind": "bert_wordpiece", "vocab": "query_vocab.txt",
                       "lower_case": config.data.query_lower_case,
                       "max_len": config.data.query_max_len}

  inputs = make_inputs(config, prepared)
  np.savez(tmp_path / "inputs.npz", **inputs)
  served = subprocess.run(
      [sys.executable, "-c", SERVE, bundle, str(tmp_path / "inputs.npz"),
       str(tmp_path / "outputs.npz")],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert served.returncode == 0, served.stderr[-3000:]
  report = last_json(served)
  assert report == {"leaked": [], "step": 6}

  got = np.load(tmp_path / "outputs.npz")
  want = reference_outputs(config, prepared, workdir, inputs)
  for n in BATCHES:
    for kind in ("q", "e"):
      assert got[f"{kind}{n}"].shape == (n, 256) and got[f"{kind}{n}"].dtype == np.float32
      np.testing.assert_allclose(got[f"{kind}{n}"], want[f"{kind}{n}"], atol=1e-5, rtol=0,
                                 err_msg=f"{kind}{n}")


@pytest.fixture
def copy_of_bundle(exported, tmp_path):
  copy = str(tmp_path / "bundle")
  shutil.copytree(exported[3], copy)
  return copy


def edit_manifest(bundle, edit):
  path = os.path.join(bundle, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


def test_a_changed_byte_in_the_weights_is_refused(copy_of_bundle):
  from omnisage.serving.bundle.loader import BundleError, load_bundle
  path = os.path.join(copy_of_bundle, "params.safetensors")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)   # inside the tensor data, past the JSON header
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(BundleError, match=r"params\.safetensors.*sha256"):
    load_bundle(copy_of_bundle)


def test_a_newer_format_version_is_refused(copy_of_bundle):
  from omnisage.serving.bundle.loader import BundleError, load_bundle
  edit_manifest(copy_of_bundle, lambda m: m.update(format_version=2))
  with pytest.raises(BundleError, match=r"format_version 2 is not supported.*format_version 1"):
    load_bundle(copy_of_bundle)


@pytest.mark.parametrize("dim", ["query_len", "entity_tokens", "continuous_dim", "embed_dim",
                                 "num_fields"])
def test_a_manifest_dim_that_disagrees_with_the_programs_is_refused(copy_of_bundle, dim):
  from omnisage.serving.bundle.loader import BundleError, load_bundle
  # The manifest is not in its own checksum list, so every file still verifies: only the dim
  # is wrong, and the error must name it.
  edit_manifest(copy_of_bundle, lambda m: m["dims"].update({dim: m["dims"][dim] + 1}))
  with pytest.raises(BundleError, match=rf"dims\.{dim} = "):
    load_bundle(copy_of_bundle)


def test_export_without_a_checkpoint_is_a_clear_error(tiny_prepared, tmp_path):
  _, prepared = tiny_prepared
  result = launch("export", *common_flags(tmp_path, prepared), f"--out={tmp_path / 'bundle'}")
  assert result.returncode == 2
  assert "no checkpoint" in result.stderr and "launch.py train" in result.stderr
  assert "Traceback" not in result.stderr
  assert "error" in last_json(result)["export"]
  assert not os.path.exists(tmp_path / "bundle")
