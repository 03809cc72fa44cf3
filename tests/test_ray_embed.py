"""`launch.py embed --config.engine=ray` (issue 19): the batch embedding job on a Ray Data actor
pool over a real two-node Ray cluster (tests/conftest.py `ray_cluster`) writes exactly the shards
of the in-process job, resumes a killed run, and survives a task that raises and an actor that
dies."""

import os

import ml_collections
import pyarrow.parquet as pq
import pytest

from tests.helpers import last_json
from tests.helpers import run_launch as launch

ROW_GROUP = 100   # several input row groups, so several tasks and shards
BATCH = 64        # smaller than a row group: several (padded) tower calls per shard


@pytest.fixture(scope="module")
def local_run(tiny_bundle, tmp_path_factory):
  """(bundle dir, pins table with small row groups, the in-process job's pins/ directory)."""
  from omnisage.serving.index.embed import embed_entities
  _, prepared, _, bundle, _ = tiny_bundle
  root = tmp_path_factory.mktemp("ray_embed")
  pins = str(root / "pins.parquet")   # the name tells the kind
  pq.write_table(pq.read_table(os.path.join(prepared, "entities", "pins.parquet")), pins,
                 row_group_size=ROW_GROUP)
  summary = embed_entities(bundle, pins, str(root / "local"), batch_size=BATCH)
  assert summary["shards"] >= 4 and summary["shards_written"] == summary["shards"]
  return bundle, pins, summary["out"]


def read_shards(kind_dir) -> dict:
  return {name: pq.read_table(os.path.join(kind_dir, name))
          for name in sorted(os.listdir(kind_dir))}


def assert_same_shards(kind_dir, local_dir):
  """Same file names, and tables equal in schema, metadata (the bundle's sha256) and values."""
  got, want = read_shards(kind_dir), read_shards(local_dir)
  assert list(got) == list(want)
  for name, table in got.items():
    assert table.equals(want[name], check_metadata=True), name


def embed_on_ray(local_run, out, **kwargs):
  from omnisage.serving.index.ray_embed import embed_entities_on_ray
  bundle, pins, _ = local_run
  return embed_entities_on_ray(bundle, pins, str(out), batch_size=BATCH, **kwargs)


def test_two_nodes_write_the_shards_of_the_local_job(ray_cluster, local_run, tmp_path):
  summary = embed_on_ray(local_run, tmp_path, workers=2)
  assert summary["engine"] == "ray" and summary["actors"] == 2
  assert summary["nodes"] == 2   # one CPU per node: the second actor must run on the other node
  assert summary["shards_written"] == summary["shards"] and summary["shards_skipped"] == 0
  assert summary["rows_embedded"] == summary["rows"] == pq.read_metadata(local_run[1]).num_rows
  assert_same_shards(summary["out"], local_run[2])


def test_a_rerun_redoes_only_missing_or_damaged_shards(ray_cluster, local_run, tmp_path):
  import shutil
  kind_dir = tmp_path / "pins"
  shutil.copytree(local_run[2], kind_dir)
  os.remove(kind_dir / "shard-00001.parquet")                   # lost with its host
  damaged = kind_dir / "shard-00002.parquet"                    # cut short on a copy
  damaged.write_bytes(damaged.read_bytes()[:200])
  (kind_dir / "shard-00003.parquet.tmp-999999").write_bytes(b"half")   # a killed writer's
  kept = {n: os.stat(kind_dir / n).st_mtime_ns for n in os.listdir(kind_dir)
          if n.endswith(".parquet") and n not in ("shard-00001.parquet", "shard-00002.parquet")}

  summary = embed_on_ray(local_run, tmp_path)
  assert summary["stale_tmp_removed"] == 1
  assert summary["shards_written"] == 2 and summary["rows_embedded"] == 2 * ROW_GROUP
  assert summary["shards_skipped"] == summary["shards"] - 2
  assert {n: os.stat(kind_dir / n).st_mtime_ns for n in kept} == kept   # untouched
  assert_same_shards(kind_dir, local_run[2])

  again = embed_on_ray(local_run, tmp_path)   # nothing left to do: no actor is even started
  assert again["shards_written"] == 0 and again["actors"] == 0
  assert again["shards_skipped"] == again["shards"]


def fault_worker(kind: str, marker: str):
  """An EmbedWorker that fails on its first attempt at row group 1, then works: "raise" raises
  in the task, "die" kills the actor's process (pre-emption, OOM: nothing to catch). The marker
  file says the fault fired; cloudpickle ships the class, closure included, to the actors."""
  from omnisage.serving.index.ray_embed import EmbedWorker

  class FaultyWorker(EmbedWorker):
    def write(self, group, path):
      if group == 1 and first_time(marker):
        if kind == "die":
          os._exit(1)
        raise RuntimeError("injected fault in row group 1")
      return super().write(group, path)

  return FaultyWorker


def first_time(marker: str) -> bool:
  try:
    with open(marker, "x"):
      return True
  except FileExistsError:
    return False


def test_a_task_that_raises_is_retried_and_without_retries_the_job_fails_then_resumes(
    ray_cluster, local_run, tmp_path):
  marker = tmp_path / "raised"
  raising = fault_worker("raise", str(marker))
  retried = embed_on_ray(local_run, tmp_path / "retried", worker_cls=raising, max_retries=1)
  assert marker.exists()   # the fault did fire
  assert retried["shards_written"] == retried["shards"]
  assert_same_shards(retried["out"], local_run[2])

  from omnisage.serving.index.ray_embed import RayEmbedError
  os.remove(marker)
  with pytest.raises(RayEmbedError, match=r"row group\(s\) \[1\] failed after 1 attempt"
                                          r".*injected fault in row group 1"):
    embed_on_ray(local_run, tmp_path / "failed", worker_cls=raising, max_retries=0)
  # The other row groups were finished; nothing half-written is left.
  left = sorted(os.listdir(tmp_path / "failed" / "pins"))
  assert left == [f"shard-{i:05d}.parquet" for i in range(retried["shards"]) if i != 1]
  resumed = embed_on_ray(local_run, tmp_path / "failed", max_retries=0)   # the fault is spent
  assert resumed["shards_written"] == 1 and resumed["rows_embedded"] == ROW_GROUP
  assert resumed["shards_skipped"] == resumed["shards"] - 1
  assert_same_shards(resumed["out"], local_run[2])


def test_an_actor_that_dies_is_restarted_and_its_row_group_redone(ray_cluster, local_run,
                                                                    tmp_path):
  marker = tmp_path / "died"
  summary = embed_on_ray(local_run, tmp_path / "out", worker_cls=fault_worker("die", str(marker)),
                         max_retries=0)
  assert marker.exists()
  assert summary["shards_written"] == summary["shards"]
  assert_same_shards(summary["out"], local_run[2])


def test_launch_embed_on_the_cluster_prints_one_json_line(ray_cluster, local_run, tmp_path):
  bundle, pins, local_dir = local_run
  result = launch("embed", f"--config.bundle={bundle}", f"--config.entities={pins}",
                  f"--out={tmp_path}", f"--config.batch_size={BATCH}", "--config.engine=ray",
                  f"--config.ray_address={ray_cluster.address}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = last_json(result)["embed"]
  assert summary["engine"] == "ray" and summary["ray_address"] == ray_cluster.address
  assert summary["shards_written"] == summary["shards"]
  assert_same_shards(tmp_path / "pins", local_dir)


@pytest.mark.parametrize("field, value, message", [
    ("engine", "spark", "config.engine must be one of"),
    ("ray_workers", -1, "config.ray_workers must be >= 0"),
    ("max_retries", -1, "config.max_retries must be >= 0"),
])
def test_a_bad_engine_setting_is_a_value_error_naming_the_field(local_run, tmp_path, field,
                                                                value, message):
  from configs.index import get_config
  from omnisage.serving.index.embed import embed_job
  bundle, pins, _ = local_run
  config = get_config()
  config.update(bundle=bundle, entities=pins, engine="ray")
  config[field] = value
  with pytest.raises(ValueError, match=message):
    embed_job(ml_collections.FrozenConfigDict(config), str(tmp_path))
  assert not os.path.exists(tmp_path / "pins")   # refused before anything was written
