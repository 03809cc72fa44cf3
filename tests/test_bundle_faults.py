"""Hostile bundles and indexes (project issue 16): a malformed manifest, a path out of the bundle,
a damaged ScaNN asset or a killed embed's leftovers are refused or cleaned with a message that
names the key or file, never a traceback; /healthz answers whatever the manifest holds."""

import json
import os
import shutil
import subprocess
import sys
import types

import httpx
import numpy as np
import pytest

from omnisage.serving.bundle.loader import Bundle, BundleError, load_bundle
from omnisage.serving.index.scann_index import IndexError_, build_index, load_index
from tests.helpers import ROOT, free_port, last_json, run_launch, running, subprocess_env
from tests.test_index import write_embeddings_dir


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
  """A copy of the session's tiny OmniSearchSage bundle, free to damage."""
  copy = str(tmp_path / "bundle")
  shutil.copytree(tiny_bundle[3], copy)
  return copy


def edit_manifest(bundle_dir, edit):
  """Applies edit(manifest) (a dict, changed in place) to the bundle's manifest.json."""
  path = os.path.join(bundle_dir, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  write_manifest(bundle_dir, manifest)


def write_manifest(bundle_dir, manifest):
  with open(os.path.join(bundle_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)


def as_array(bundle_dir):
  """The bundle's manifest wrapped in a JSON array: valid JSON, not a manifest."""
  with open(os.path.join(bundle_dir, "manifest.json")) as f:
    write_manifest(bundle_dir, [json.load(f)])


def refused(bundle_dir, pattern) -> str:
  with pytest.raises(BundleError, match=pattern) as error:
    load_bundle(bundle_dir)
  return str(error.value)


# --- the manifest's shape ------------------------------------------------------------------------

def test_a_manifest_that_is_a_json_array_is_refused(bundle):
  as_array(bundle)
  refused(bundle, r"^manifest\.json: must be a JSON object, got a JSON array$")


def test_a_manifest_without_towers_is_refused(bundle):
  edit_manifest(bundle, lambda m: m.pop("towers"))
  refused(bundle, r"^manifest\.json: towers is missing$")


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m["dims"].update(compat_dim="abc"),
     r"^manifest\.json: dims\.compat_dim must be a positive int, got 'abc' \(string\)$"),
    (lambda m: m["dims"].update(compat_dim=0), r"dims\.compat_dim must be a positive int, got 0"),
    (lambda m: m["dims"].pop("compat_dim"), r"^manifest\.json: dims\.compat_dim is missing$"),
    (lambda m: m.update(dims=[256]), r"^manifest\.json: dims must be a JSON object, got \[256\]"),
    (lambda m: m["towers"]["query_tower"].update(params=[{"key": "x", "shape": ["1"],
                                                          "dtype": "float32"}]),
     r"towers\.query_tower\.params\[0\]\.shape must be a list of ints >= 0, got \['1'\]"),
    (lambda m: m["towers"].update(extra_tower=m["towers"]["query_tower"]),
     r"towers must be exactly \['entity_tower', 'query_tower'\]"),
    (lambda m: m["files"]["params.safetensors"].update(bytes="12"),
     r"files\['params\.safetensors'\]\.bytes must be an int >= 0, got '12'"),
    (lambda m: m["files"]["params.safetensors"].update(sha256=None),
     r"files\['params\.safetensors'\]\.sha256 must be 64 lowercase hex digits"),
    (lambda m: m["tokenizer"].update(max_len="64"),
     r"tokenizer\.max_len must be a positive int, got '64'"),
    (lambda m: m["hashing"].update(hash_seed=1.5), r"hashing\.hash_seed must be an int, got 1\.5"),
], ids=["compat_dim_abc", "compat_dim_0", "no_compat_dim", "dims_array", "shape_strings",
        "extra_tower", "bytes_string", "sha256_null", "max_len_string", "hash_seed_float"])
def test_a_mistyped_manifest_field_is_refused_naming_its_key(bundle, edit, pattern):
  edit_manifest(bundle, edit)
  refused(bundle, pattern)


def test_a_string_dim_is_named_with_its_type(bundle):
  # Before: "dims.embed_dim = 256 but query_tower.jaxexport's output has 256".
  edit_manifest(bundle, lambda m: m["dims"].update(embed_dim="256"))
  message = refused(bundle, r"^manifest\.json: dims\.embed_dim must be a positive int, "
                            r"got '256' \(string\)$")
  assert " but " not in message


@pytest.mark.parametrize("step", ["abc", -1, True, 6.0, None])
def test_a_step_that_is_not_a_count_is_refused_at_load(bundle, step):
  edit_manifest(bundle, lambda m: m.update(step=step))
  refused(bundle, rf"^manifest\.json: step must be an int >= 0, got {step!r}")


def test_the_two_tower_loader_checks_the_manifest_too(tmp_path):
  from omnisage.serving.twotower.bundle import load_twotower_bundle
  base = {"format_version": 1, "system": "twotower", "step": 3, "dims": {"embed_dim": 64},
          "towers": {}, "files": {}}
  cases = [([base], r"must be a JSON object, got a JSON array"),
           ({**base, "step": "abc"}, r"^manifest\.json: step must be an int >= 0, got 'abc'"),
           ({**base, "dims": {"embed_dim": "64"}},
            r"dims\.embed_dim must be a positive int, got '64'"),
           ({**base, "dims": {"embed_dim": 64}},
            r"^manifest\.json: dims\.history_len is missing$")]
  for manifest, pattern in cases:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=pattern):
      load_twotower_bundle(str(tmp_path))


# --- paths out of the bundle ---------------------------------------------------------------------

@pytest.fixture
def outside_vocab(bundle, tmp_path):
  """A perfectly good vocabulary next to (not inside) the bundle: the loader must not read it."""
  path = tmp_path / "outside_vocab.txt"
  shutil.copy(os.path.join(bundle, "query_vocab.txt"), path)
  return str(path)


@pytest.mark.parametrize("vocab", ["../../../../etc/passwd", "/etc/passwd", "../outside_vocab.txt"])
def test_a_tokenizer_vocab_outside_the_bundle_is_refused_not_read(bundle, outside_vocab, vocab,
                                                                  monkeypatch):
  from omnisage.data import tokenizer as tokenizer_module
  from omnisage.data.tokenizer import WordPieceTokenizer
  edit_manifest(bundle, lambda m: m["tokenizer"].update(vocab=vocab))
  refused(bundle, rf"^manifest\.json: tokenizer\.vocab '{vocab}' lies outside the bundle")

  # A bare directory never went through load_bundle: from_bundle refuses it without opening it.
  opened = []
  real_open = open

  def spy(file, *args, **kwargs):
    opened.append(os.path.realpath(file))
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(tokenizer_module, "open", spy, raising=False)
  with pytest.raises(ValueError, match=r"tokenizer\.vocab.*inside the bundle directory"):
    WordPieceTokenizer.from_bundle(bundle)
  assert opened == [os.path.realpath(os.path.join(bundle, "manifest.json"))]


def test_a_symlink_out_of_the_bundle_is_refused(bundle, outside_vocab):
  # Same bytes, so the sha256 matches: only the confinement can refuse it.
  inside = os.path.join(bundle, "query_vocab.txt")
  os.remove(inside)
  os.symlink(outside_vocab, inside)
  refused(bundle, r"^manifest\.json: files entry 'query_vocab\.txt' lies outside "
                  r"the bundle directory")


def test_a_tower_function_outside_the_bundle_or_unchecksummed_is_refused(bundle, tmp_path):
  shutil.copy(os.path.join(bundle, "query_tower.jaxexport"), tmp_path / "q.jaxexport")
  edit_manifest(bundle, lambda m: m["towers"]["query_tower"].update(function="../q.jaxexport"))
  refused(bundle, r"towers\.query_tower\.function '\.\./q\.jaxexport' lies outside the bundle")

  shutil.copy(os.path.join(bundle, "query_tower.jaxexport"), os.path.join(bundle, "q.jaxexport"))
  edit_manifest(bundle, lambda m: m["towers"]["query_tower"].update(function="q.jaxexport"))
  refused(bundle, r"towers\.query_tower\.function 'q\.jaxexport' is not listed in files")


# --- /healthz ------------------------------------------------------------------------------------

class _Index:
  dim, size = 8, 5


def test_healthz_answers_json_whatever_the_manifest_holds():
  from omnisage.serving.omnisearchsage.service import create_app
  # Built by hand, past load_bundle (which would refuse this step): the handler's own guard.
  odd = Bundle(path="nowhere", manifest={"step": "abc", "dims": {"embed_dim": 8, "query_len": 4}},
               params={}, functions={})
  app = create_app(odd, {"pins": _Index()}, tokenizer=types.SimpleNamespace(), warmup=False)
  with running(app) as url:
    response = httpx.get(url + "/healthz")
  assert response.status_code == 200, response.text
  health = response.json()
  assert health["status"] == "ok" and health["bundle_step"] is None
  assert health["embed_dim"] == 8 and health["index_sizes"] == {"pins": 5}
  assert set(health["errors"]) == {"bundle_step"}
  assert "ValueError" in health["errors"]["bundle_step"]


def test_two_tower_healthz_answers_json_whatever_the_manifest_holds():
  from omnisage.serving.twotower.bundle import TwoTowerBundle
  from omnisage.serving.twotower.service import create_recommend_app
  odd = TwoTowerBundle(path="nowhere", manifest={"step": "abc", "dims": {"embed_dim": 8,
                                                                         "history_len": 4}},
                       params={}, functions={}, catalogue=None)
  app = create_recommend_app(odd, {"items": _Index()}, warmup=False)
  with running(app) as url:
    response = httpx.get(url + "/healthz")
  assert response.status_code == 200, response.text
  health = response.json()
  assert health["bundle_step"] is None and health["index_size"] == 5
  assert set(health["errors"]) == {"bundle_step"}


# --- ScaNN assets --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree_index(tmp_path_factory):
  """A small index whose pins are a tree_ah searcher (so it has serialized_partitioner.pb)."""
  # dim 256: the tiny bundle's embed_dim, so `launch.py serve` could serve it with that bundle.
  embeddings = write_embeddings_dir(tmp_path_factory.mktemp("faults_emb"), pins=2500,
                                    products=300, queries=300, dim=256)
  out = str(tmp_path_factory.mktemp("faults_index"))
  build_index(embeddings, out, target_recall=0.9, tune_queries_per_split=200, qps_seconds=0.05)
  assert os.path.isfile(os.path.join(out, "pins", "scann", "serialized_partitioner.pb"))
  return out


@pytest.fixture
def index(tree_index, tmp_path):
  copy = str(tmp_path / "index")
  shutil.copytree(tree_index, copy)
  return copy


def test_index_json_lists_the_checksum_of_every_scann_asset(tree_index):
  from omnisage.serving.bundle.loader import sha256_of
  kind_dir = os.path.join(tree_index, "pins")
  with open(os.path.join(kind_dir, "index.json")) as f:
    files = json.load(f)["files"]
  on_disk = sorted(os.path.relpath(os.path.join(root, name), kind_dir)
                   for root, _, names in os.walk(kind_dir) for name in names)
  assert sorted(files) == [name for name in on_disk if name != "index.json"]
  assert {"items.parquet", "scann/serialized_partitioner.pb", "scann/dataset.npy",
          "scann/scann_assets.pbtxt"} <= set(files)
  for name, info in files.items():
    assert info == {"sha256": sha256_of(os.path.join(kind_dir, name)),
                    "bytes": os.path.getsize(os.path.join(kind_dir, name))}


def test_a_garbage_scann_asset_is_refused_naming_the_file(index):
  path = os.path.join(index, "pins", "scann", "serialized_partitioner.pb")
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  with pytest.raises(IndexError_, match=r"pins/scann/serialized_partitioner\.pb: sha256 differs"):
    load_index(index)


def test_an_unlisted_file_or_an_index_without_checksums_is_refused(index):
  extra = os.path.join(index, "products", "scann", "extra.npy")
  np.save(extra, np.zeros(3))
  with pytest.raises(IndexError_, match=r"products/scann/extra\.npy: not listed in"):
    load_index(index)
  os.remove(extra)
  info_path = os.path.join(index, "queries", "index.json")
  with open(info_path) as f:
    info = json.load(f)
  del info["files"]
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(IndexError_, match=r"queries/index\.json: no 'files' checksums.*rebuild "
                                        r"with launch\.py index"):
    load_index(index)


# --- embed's temporary shards --------------------------------------------------------------------

def test_a_killed_embeds_temporary_shards_are_removed_by_the_next_run(tiny_bundle, tmp_path):
  from omnisage.serving.index.embed import embed_entities
  _, prepared, _, bundle_dir, _ = tiny_bundle
  kind_dir = tmp_path / "embeddings" / "queries"
  kind_dir.mkdir(parents=True)
  dead = [f"shard-00000.parquet.tmp-{os.getpid() + 1}", "shard-00007.parquet.tmp-1"]
  for name in dead + ["notes.txt.tmp-1"]:   # the last is not embed's: kept
    (kind_dir / name).write_bytes(b"half a shard")
  summary = embed_entities(bundle_dir, os.path.join(prepared, "entities", "queries.parquet"),
                           str(tmp_path / "embeddings"), batch_size=64)
  assert summary["stale_tmp_removed"] == 2
  left = sorted(os.listdir(kind_dir))
  assert "notes.txt.tmp-1" in left and not any(name in left for name in dead)
  assert [name for name in left if ".tmp-" in name] == ["notes.txt.tmp-1"]


# --- through launch.py: exit 2, `error:`, no traceback, the closing JSON line --------------------

def assert_clean_error(result, command, *phrases):
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "error: " in result.stderr
  error = last_json(result)[command]["error"]
  for phrase in phrases:
    assert phrase in error and phrase in result.stderr, (phrase, error)


def test_launch_embed_with_an_array_manifest_is_a_clean_error(bundle, tiny_bundle, tmp_path):
  as_array(bundle)
  pins = os.path.join(tiny_bundle[1], "entities", "pins.parquet")
  result = run_launch("embed", f"--config.bundle={bundle}", f"--config.entities={pins}",
                      f"--out={tmp_path / 'out'}")
  assert_clean_error(result, "embed", "manifest.json: must be a JSON object, got a JSON array")


def test_launch_embed_with_a_string_compat_dim_is_a_clean_error(bundle, tiny_bundle, tmp_path):
  edit_manifest(bundle, lambda m: m["dims"].update(compat_dim="abc"))
  pins = os.path.join(tiny_bundle[1], "entities", "pins.parquet")
  result = run_launch("embed", f"--config.bundle={bundle}", f"--config.entities={pins}",
                      f"--out={tmp_path / 'out'}")
  assert_clean_error(result, "embed", "dims.compat_dim must be a positive int, got 'abc'")


def launch_serve(bundle_dir, index_dir, timeout=180):
  """`launch.py serve` that must exit by itself; fails the test if it starts serving instead."""
  try:
    return subprocess.run(
        [sys.executable, "launch.py", "serve", f"--config.bundle={bundle_dir}",
         f"--config.index={index_dir}", f"--config.port={free_port()}"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.fail("launch.py serve started serving instead of refusing")


def test_launch_serve_with_a_string_step_is_a_clean_error(bundle, index):
  edit_manifest(bundle, lambda m: m.update(step="abc"))
  assert_clean_error(launch_serve(bundle, index), "serve",
                     "manifest.json: step must be an int >= 0, got 'abc'")


def test_launch_serve_with_a_garbage_scann_asset_is_a_clean_error(tiny_bundle, index):
  with open(os.path.join(index, "pins", "scann", "serialized_partitioner.pb"), "wb") as f:
    f.write(b"\x08\x96\x01 not a partitioner " * 64)
  assert_clean_error(launch_serve(tiny_bundle[3], index), "serve",
                     "serialized_partitioner.pb: sha256 differs")
