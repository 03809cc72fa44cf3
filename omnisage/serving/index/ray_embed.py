"""The batch embedding job on Ray Data: embed.py's shards, written by an actor pool on a cluster.

Pinterest runs its daily batch inference on Ray; this is `launch.py embed` with
`--config.engine=ray` (docs/scale_out.md). The unit of work is the one of the in-process job: an
input row group, embedded into `<out>/<kind>/shard-NNNNN.parquet` by embed.py's `write_shard`
(same columns, schema metadata, tmp-then-rename), so the two engines write identical files and
either one resumes the other's run.

  driver   checks every shard (`is_complete`: exists, right length, made by this bundle), removes
           the tmp files a killed run left, and makes a dataset of the row-group ids still to do,
           one block each, so Ray schedules every row group as its own task.
  actors   `EmbedWorker`: each loads the bundle ONCE (its constructor) and the input table's
           footer, then embeds whole row groups; one GPU per actor where the cluster has GPUs,
           one CPU otherwise. Bundle, table and output directory must be at the same path on
           every node (shared storage); an actor that sees a different bundle there refuses to
           start rather than write shards of another model.
  retries  an actor process that dies (pre-emption, OOM) is restarted and its task re-run (Ray
           Data's actor defaults: max_restarts=-1, max_task_retries=-1); a row group whose
           embedding raises is tried again in the same actor, up to `max_retries` times. Each
           attempt first checks the shard again, so one that died after its rename is not redone.
           A row group still failing is reported, not raised, in the actor: the other row groups
           finish, then the job fails with RayEmbedError naming it, and a re-run resumes.

Usage: `summary = embed_entities_on_ray("runs/demo/bundle",
"runs/demo/prepared/entities/pins.parquet", "runs/demo/embeddings", address=None)`.
"""

import gc
import os
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data

from omnisage.data.ray_runtime import has_gpus, init_ray
from omnisage.serving.bundle.loader import load_bundle
from omnisage.serving.index.embed import (
  entity_kind,
  is_complete,
  job_summary,
  remove_stale_tmp,
  shard_layout,
  shard_path,
  write_shard,
)


class EmbedWorker:
  """A Ray Data actor: the bundle is loaded (and its programs compiled per batch shape) once per
  actor, not once per row group; each call embeds the row groups of one block."""

  def __init__(self, bundle_path: str, entities_parquet: str, kind_dir: str, kind: str,
               batch_size: int, bundle_id: bytes, max_retries: int):
    self.bundle = load_bundle(bundle_path)
    self.source = pq.ParquetFile(entities_parquet)
    self.layout = shard_layout(self.bundle, self.source, kind, entities_parquet)
    if self.layout.bundle_id != bundle_id:
      raise ValueError(f"{bundle_path} on this node is not the bundle the job was started with "
                       f"(params sha256 {self.layout.bundle_id.decode()[:12]}..., expected "
                       f"{bundle_id.decode()[:12]}...): every node must see the same files")
    self.kind_dir = kind_dir
    self.batch_size = batch_size
    self.max_retries = max_retries

  def __call__(self, batch: dict) -> dict:
    rows, written, errors = [], [], []
    for group in batch["group"].tolist():
      r, w, e = self.embed_group(group)
      rows.append(r)
      written.append(w)
      errors.append(e)
    node = ray.get_runtime_context().get_node_id()   # the summary counts the nodes used
    return {"group": batch["group"], "rows": np.asarray(rows, np.int64),
            "written": np.asarray(written, np.int64), "error": np.asarray(errors, object),
            "node": np.asarray([node] * len(rows), object)}

  def embed_group(self, group: int) -> tuple[int, int, str]:
    """(rows embedded, shards written, "" or the last error) of one row group, tried up to
    1 + max_retries times. A failure is returned, not raised: Ray Data would abort the whole
    dataset on it and leave the failed pool's actors holding their CPUs or GPUs, while this way
    every other row group still gets done and the driver reports the failures."""
    path = shard_path(self.kind_dir, group)
    error = ""
    for _ in range(1 + self.max_retries):
      # A retried task may find its shard done: the first attempt died after the rename.
      if is_complete(path, self.layout.group_rows[group], self.layout.bundle_id):
        return 0, 0, ""
      try:
        return self.write(group, path), 1, ""
      except Exception as e:   # write_shard removed its tmp file; the next attempt starts clean
        error = f"{type(e).__name__}: {e}"
    return 0, 0, error

  def write(self, group: int, path: str) -> int:
    """One attempt at one shard (embed.write_shard: tmp file, then rename); returns its rows."""
    return write_shard(self.bundle, self.source, group, self.layout, path, self.batch_size)


def embed_entities_on_ray(bundle_path: str, entities_parquet: str, out_dir: str,
                          batch_size: int = 1024, kind: str | None = None,
                          address: str | None = None, workers: int = 0, max_retries: int = 2,
                          worker_cls=EmbedWorker) -> dict:
  """embed.embed_entities on a Ray Data actor pool; returns the same summary, plus the engine,
  the actors and the cluster's resources.

  address: the Ray cluster (host:port or "auto"); None: a local instance in this process (or the
  one this process already joined). workers: actors in the pool; 0: one per GPU, else one per
  CPU, at most one per row group to do. worker_cls: EmbedWorker or a subclass (tests inject
  faults with one).
  """
  t0 = time.time()
  if workers < 0:
    raise ValueError(f"config.ray_workers must be >= 0 (0: one per GPU or CPU), got {workers}")
  if max_retries < 0:
    raise ValueError(f"config.max_retries must be >= 0, got {max_retries}")
  kind = entity_kind(entities_parquet, kind, batch_size)
  # The driver checks the bundle and the table before any actor starts, so a user's mistake is
  # one clear error here, not one per actor.
  bundle = load_bundle(bundle_path)
  source = pq.ParquetFile(entities_parquet)
  layout = shard_layout(bundle, source, kind, entities_parquet)
  del bundle
  kind_dir = os.path.join(out_dir, kind)
  os.makedirs(kind_dir, exist_ok=True)
  stale = remove_stale_tmp(kind_dir, process=(0, 1))   # the driver owns every shard
  groups = list(range(source.num_row_groups))
  todo = [i for i in groups
          if not is_complete(shard_path(kind_dir, i), layout.group_rows[i], layout.bundle_id)]

  resources = init_ray(address)
  gpu = has_gpus(resources)
  if workers == 0:
    workers = int(resources.get("GPU" if gpu else "CPU", 1))
  workers = max(1, min(workers, len(todo)))
  embedded = written = nodes = 0
  if todo:
    results = _run_pool(worker_cls, todo, workers, gpu,
                        (bundle_path, entities_parquet, kind_dir, kind, batch_size,
                         layout.bundle_id, max_retries))
    failed = {int(r["group"]): r["error"] for r in results if r["error"]}
    if failed:
      first = min(failed)
      raise RayEmbedError(f"ray embed: row group(s) {sorted(failed)} failed after "
                          f"{1 + max_retries} attempt(s) (config.max_retries={max_retries}); "
                          f"the others are done and a re-run resumes. Row group {first}: "
                          f"{failed[first]}")
    nodes = len({r["node"] for r in results})
    embedded = int(sum(r["rows"] for r in results))
    written = int(sum(r["written"] for r in results))
    if sorted(int(r["group"]) for r in results) != todo:   # Ray Data lost or doubled a block
      raise RuntimeError(f"ray embed: results for row groups "
                         f"{sorted(int(r['group']) for r in results)}, expected {todo}")
  summary = job_summary(layout, bundle_path, entities_parquet, kind_dir, groups, written,
                        len(groups) - len(todo), embedded, stale, time.time() - t0)
  summary.update(engine="ray", ray_address=address or "local", actors=workers if todo else 0,
                 nodes=nodes,
                 actor_resources={"CPU": 1, "GPU": 1} if gpu else {"CPU": 1},
                 cluster_resources={k: resources[k] for k in ("CPU", "GPU") if k in resources})
  return summary


def _run_pool(worker_cls, todo: list, workers: int, gpu: bool, constructor_args: tuple) -> list:
  """Runs worker_cls over the row groups in `todo`: one block (one task) per row group."""
  ds = ray.data.from_items([{"group": i} for i in todo], override_num_blocks=len(todo))
  ds = ds.map_batches(worker_cls, batch_size=1, fn_constructor_args=constructor_args,
                      compute=ray.data.ActorPoolStrategy(size=workers),
                      num_gpus=1 if gpu else 0, num_cpus=1)
  try:
    return ds.take_all()
  except Exception as error:   # re-raised below, without its traceback
    failure = f"{type(error).__name__}: {error}"
  del ds
  # Only what EmbedWorker cannot catch gets here (an actor that cannot start, Ray itself). A
  # failed pool's actors are released, not killed: they live until their last handle goes, and
  # Ray's exception holds handles through its traceback. Raised without it, collected now.
  gc.collect()
  raise RayEmbedError(f"ray embed failed (a re-run resumes from the finished shards): "
                      f"{failure}")


class RayEmbedError(RuntimeError):
  """Row groups failed past their retries, or the pool itself failed; the message says which."""
