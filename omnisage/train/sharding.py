"""Device mesh and the one table of how every array is sharded.

Two named mesh axes (big_vision / MaxText style):
  data   the global batch is split over it (data parallelism);
  model  the big embedding tables are split over it by rows (model parallelism).

Sharding table (logical array -> PartitionSpec):

  | array                                     | spec              | why                           |
  |-------------------------------------------|-------------------|-------------------------------|
  | hash table E [hash_rows, d]               | P("model", None)  | largest parameter (100k x d)  |
  | per-token weights W [V, 2]                | P("model", None)  | V ~ 1.26M in production       |
  | hash-index table [V, 2] (constant)        | P("model", None)  | follows W                     |
  | every other parameter / optimiser slot    | P()  replicated   | small dense layers            |
  | batch arrays [B, ...]                     | P("data")         | rows of the global batch      |
  | shared random negatives [N, ...]          | P("data")         | each host samples its part    |
  | frequency-estimator arrays, step, rng     | P()  replicated   | every device sees every id    |

Parameter specs are not written here twice: the model declares them with `nnx.with_partitioning`
and `nnx.get_partition_spec` reads them back. One jitted step runs over the global batch; XLA's
sharding propagation (GSPMD) turns `q @ p.T` over data-sharded rows into cross-device in-batch
negatives without hand-written collectives.

Usage: `mesh = make_mesh(config.mesh); batch = shard_batch(mesh, host_batch)`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, model) mesh over `devices` (default: all); `data=-1` takes what `model` leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  model = int(mesh_config.model)
  data = int(mesh_config.data)
  if data == -1:
    if n % model:
      raise ValueError(f"mesh.model={model} does not divide the {n} devices")
    data = n // model
  if data * model != n:
    raise ValueError(f"mesh.data*mesh.model = {data}*{model} != {n} devices")
  # Auto axis types: sharded gathers from the row-sharded tables then need no out_sharding
  # (jax.make_mesh defaults to Explicit axes in this jax version).
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def data_axis_size(mesh) -> int:
  return mesh.shape[DATA]


def shard_batch(mesh, host_batch):
  """Builds global arrays sharded over `data` from this process's part of the batch.

  On one host the local part is the whole batch; on several hosts each contributes its rows
  (`jax.make_array_from_process_local_data` stitches them), so the pipeline never materialises the
  global batch on one host.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def named_shardings(mesh, state_specs):
  """NamedShardings for a pytree of PartitionSpecs (from `nnx.get_partition_spec`)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs,
                      is_leaf=lambda x: isinstance(x, P))
