"""Tower microbatching: a tower runs over the global batch in row chunks, recomputed in backward.

Why: the loss needs every embedding of the global batch at once (in-batch negatives span all of
it), but a tower's activations need not all exist at once. At production size (SPEC §1: a
DistilBERT query tower over ~20k queries per device, 384 hashed n-grams per entity over ~29k
entities per device) the towers' saved activations far exceed a device's memory while the
embeddings are small (docs/performance.md, the compile-only check). This is GradCache (Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") written as one
JAX program: `lax.map` walks the chunks and `jax.checkpoint` on its body keeps only each chunk's
inputs, so the backward pass re-runs one chunk's forward at a time and its activations are freed
before the next. Peak activation memory is then one chunk's, at the cost of one extra forward pass
of the towers (~1/3 more tower FLOPs). Loss and gradients are unchanged (tests/test_microbatch.py).

Sharding: the batch is split over the mesh axis `data` by contiguous row blocks, one per device.
A chunk takes `chunk_rows` rows from EVERY device's block ([D, local] -> [chunks, D * chunk_rows])
so every device works on every chunk; chunking the global rows in order would put each chunk on
one device and serialise the mesh.

Usage:
  emb = map_in_chunks(tower, (tokens, fields, continuous), chunk_rows=512, data_shards=8)
"""

import jax
import jax.numpy as jnp


def data_shards_of(config) -> int:
  """Devices on the mesh axis `data` for `config` (mesh.data = -1 takes what `model` leaves)."""
  data = int(config.mesh.data)
  return data if data > 0 else max(jax.device_count() // int(config.mesh.model), 1)


def map_in_chunks(fn, arrays: tuple, *, chunk_rows: int, data_shards: int = 1):
  """fn(*arrays) computed `chunk_rows` rows per device at a time (see the module docstring).

  arrays: leading dimension = rows (the same for all), sharded over `data_shards` devices in
  contiguous blocks. fn must be row-wise (row i of the output depends on row i of the inputs only).
  chunk_rows <= 0, or a device block no larger than one chunk, calls fn directly. A block that is
  not a multiple of chunk_rows is zero-padded (id 0 = padding everywhere) and the padding rows'
  outputs are dropped, so they receive no gradient.
  """
  rows = arrays[0].shape[0]
  if any(a.shape[0] != rows for a in arrays):
    raise ValueError(f"map_in_chunks: leading dimensions differ: {[a.shape for a in arrays]}")
  if rows % data_shards:
    data_shards = 1
  local = rows // data_shards
  if chunk_rows <= 0 or local <= chunk_rows:
    return fn(*arrays)
  chunks = -(-local // chunk_rows)
  pad = chunks * chunk_rows - local

  def split(x):
    x = x.reshape(data_shards, local, *x.shape[1:])
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(data_shards, chunks, chunk_rows, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(chunks, data_shards * chunk_rows, *x.shape[3:])

  def merge(y):
    y = y.reshape(chunks, data_shards, chunk_rows, *y.shape[2:]).swapaxes(0, 1)
    y = y.reshape(data_shards, chunks * chunk_rows, *y.shape[3:])[:, :local]
    return y.reshape(rows, *y.shape[2:])

  body = jax.checkpoint(lambda xs: fn(*xs))
  out = jax.lax.map(body, tuple(split(a) for a in arrays))
  return jax.tree.map(merge, out)
