"""Building the feature-carrying examples without a catalogue in memory
(omnisage/data/omnisearchsage/feature_examples.py): the entity records read by index, records
joined without decoding, and the same bytes whether the shards are written here or as Ray tasks."""

import filecmp
import glob
import os
import shutil

import numpy as np
import pyarrow.parquet as pq

from omnisage.data.omnisearchsage import feature_examples as fe


def test_join_records_equals_encoding_the_renamed_union():
  rng = np.random.default_rng(0)

  def arrays(n):
    return {"entity_ids": rng.integers(0, 99, n).astype(np.int32),
            "entity_tokens": rng.integers(0, 9, int(rng.integers(0, 7))).astype(np.int32),
            "entity_visual": rng.standard_normal((n, 3)).astype(np.float16),
            "entity_has_legacy": rng.random(n) < 0.5}
  for _ in range(20):
    parts = [(prefix, arrays(int(rng.integers(0, 4)))) for prefix in ("query", "pos", "hard")]
    want = fe.encode_arrays({f"{p}{k[len('entity'):]}": v for p, a in parts for k, v in a.items()})
    assert fe.join_records([(p, fe.encode_arrays(a)) for p, a in parts]) == want


def test_entity_rows_read_by_index_equal_the_table(tiny_prepared, tmp_path):
  """EntityRows (records on disk) against _TableRows of the whole Parquet table in memory."""
  _, prepared = tiny_prepared
  for kind in ("pins", "products", "queries"):
    has_legacy = fe.write_entity_records(prepared, kind, str(tmp_path))
    table = fe._TableRows(pq.read_table(os.path.join(prepared, "entities", f"{kind}.parquet")),
                          kind)
    if kind != "queries":
      assert np.array_equal(has_legacy, table.has_legacy) and has_legacy.any()
    rows = fe.EntityRows(prepared, kind, str(tmp_path))
    assert rows.size == table.size
    rng = np.random.default_rng(1)
    for idx in ([], [0], [table.size - 1], rng.integers(0, table.size, 17),
                [5, 5, 2]):
      rows.prefetch(idx[:3])   # some served from the prefetched records, some read alone
      got, want = rows.block(idx, "hard"), table.block(idx, "hard")
      assert list(got) == list(want)
      for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    rows.close()


def test_ray_tasks_write_the_same_examples_as_one_process(tiny_prepared, tmp_path, monkeypatch):
  """prepare wrote <prepared>/feature_examples with Ray tasks (the session's cluster); the same
  files, byte for byte, come from writing every shard in this process."""
  config, prepared = tiny_prepared
  copy = tmp_path / "prepared"
  shutil.copytree(prepared, copy)
  monkeypatch.setattr(fe, "_run_all", lambda fn, calls: [fn(*args) for args in calls])
  fe.write_feature_examples(config, str(copy))
  ray_dir, here = fe.directory_of(prepared), fe.directory_of(str(copy))
  files = sorted(os.path.relpath(p, ray_dir) for p in glob.glob(f"{ray_dir}/**/*", recursive=True)
                 if os.path.isfile(p))
  assert files == sorted(os.path.relpath(p, here) for p in glob.glob(f"{here}/**/*",
                                                                       recursive=True)
                         if os.path.isfile(p))
  assert any(f.startswith("train/") for f in files) and "entity_records" not in str(files)
  for f in files:
    if f != "meta.json":   # it names its inputs by their mtimes
      assert filecmp.cmp(os.path.join(ray_dir, f), os.path.join(here, f), shallow=False), f
