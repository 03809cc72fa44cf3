"""PinText's serving bundle (SPEC §2): vocab.txt + vectors.npy + manifest.json with sha256s.

The bundle embeds any text with NumPy only (omnisage.models.pintext.TextEmbedder.load reads it).

Usage: `summary = export(config, workdir, "runs/pintext/bundle")`.
"""

import json
import os

import numpy as np

from omnisage.models.pintext import (
  BUNDLE_FORMAT,
  BUNDLE_VERSION,
  MANIFEST,
  VECTORS_FILE,
  VOCAB_FILE,
  sha256_of,
)
from omnisage.train.pintext.trainer import latest_table


def export(config, workdir: str, out: str) -> dict:
  step, vocab, trained, _ = latest_table(config, workdir)
  manifest = write_bundle(out, vocab, trained[:len(vocab)], {
      "step": step, "variant": config.variant, "tasks": list(config.tasks),
      "loss": {"margin": config.loss.margin, "negatives": config.loss.negatives,
               "radius": config.loss.radius}})
  return {"bundle": out, "step": step, "vocab_size": manifest["vocab_size"],
          "dim": manifest["dim"]}


def write_bundle(out: str, vocab: list[str], vectors: np.ndarray, manifest: dict) -> dict:
  """vocab.txt + vectors.npy (float32 [len(vocab), d]) + manifest.json (with sha256s)."""
  if vectors.shape[0] != len(vocab):
    raise ValueError(f"{len(vocab)} words but {vectors.shape[0]} vectors")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, VOCAB_FILE), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  np.save(os.path.join(out, VECTORS_FILE), np.asarray(vectors, np.float32))
  manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
              "vocab_size": len(vocab), "dim": int(vectors.shape[1]),
              "tokenizer": {"kind": "lowercase_words", "normalize": "NFKC+casefold",
                            "regex": r"\w+", "padding_id": 0},
              **manifest,
              "files": {name: sha256_of(os.path.join(out, name))
                        for name in (VOCAB_FILE, VECTORS_FILE)}}
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest
