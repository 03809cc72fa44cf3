"""Ray for the batch jobs: start it once per process, in-process by default or on a cluster.

The batch jobs (`launch.py prepare`, `launch.py embed` with `engine="ray"`, the PinnerSage job
with `engine="ray"`) run on Ray Data (docs/scale_out.md). On one machine nothing needs setting
up: Ray starts inside the job's process and stops with it. On a cluster, `ray start --head` on
one node and `ray start --address=HEAD:6379` on the others; the job then joins it with
`--config.ray_address=HEAD:6379` (prepare: `data.ray_address`; or "auto": the cluster started on
this machine). A process that already joined Ray (a test's cluster, a notebook) keeps its
connection: init_ray never restarts or re-points it.

Usage: `init_ray(config.ray_address)`.
"""

import logging

log = logging.getLogger("omnisage")


def init_ray(address: str | None = None, object_store_gb: float | None = None) -> dict:
  """Joins Ray once: `address` None or "" starts a private local instance ("local"), with an
  object store of `object_store_gb` (None or 0: Ray's default; objects beyond it spill to
  disk); anything else is passed to ray.init (host:port, "auto", "ray://host:10001"), whose
  object store its `ray start` set. Returns the cluster's resources (CPU, GPU, ...), which
  decide how many workers a job asks for."""
  import ray
  if not ray.is_initialized():
    # "local", not ray.init()'s default: the default joins whatever cluster RAY_ADDRESS or a
    # `ray start` on this machine points to, and a local run must not land on a shared cluster
    # by accident. The dashboard is off: batch jobs report through their own summary.
    store = int(object_store_gb * 1024 ** 3) if object_store_gb and not address else None
    ray.init(address=address or "local", include_dashboard=False, object_store_memory=store,
             logging_level=logging.WARNING, log_to_driver=True)
    log.info("ray: joined %s", address or "a new local instance")
  return {k: float(v) for k, v in ray.cluster_resources().items()}


def has_gpus(resources: dict) -> bool:
  return resources.get("GPU", 0.0) >= 1.0
