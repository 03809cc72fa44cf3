"""PinText evaluation (SPEC §2): validation ranking and WANDS kNN interest classification.

Validation (the model-selection signal; WANDS is never used for it): per task, each validation
pair's positive is ranked by cosine against `eval.val_candidates` random catalogue items (seeded,
the positive excluded); Recall@10 and MRR.

WANDS (SPEC §2 "kNN query -> interest classification"): each query's nearest OTHER query by
cosine (exact brute-force search) predicts its class; leave-one-out precision@1. Ties go to the
lowest query index (file order). `answerable` restricts to queries whose class has another member
(singleton classes can never be hit).

Usage:
  ev = Evaluator(config, prepared=prepared, vocab=vocab)
  ev.run(statics, params)    # {"validation/mean_recall@10": r, "wands/precision@1": p, ...}
"""

import jax
import numpy as np

from omnisage.data.pintext import pairs as pintext_pairs
from omnisage.models.pintext import TextEmbedder, average, table_to_numpy
from omnisage.train import margin_loss
from omnisage.train.evaluators.recall import require_finite


class Evaluator:
  """Validation Recall@10 / MRR per task and WANDS precision@1 of a dictionary."""

  def __init__(self, config, *, prepared: str, vocab: list[str], **_):
    self.config, self.prepared, self.vocab = config, prepared, vocab

  def evaluate_table(self, table: np.ndarray) -> dict:
    """{"validation": per task, "wands": kNN} of a host dictionary [rows, d] (nested)."""
    return {"validation": validation(self.config, self.prepared, table),
            "wands": wands_eval(self.prepared, TextEmbedder(self.vocab, table[:len(self.vocab)]))}

  def run(self, statics, params) -> dict[str, float]:
    del statics   # the dictionary is the whole model
    result = self.evaluate_table(table_to_numpy(jax.tree.leaves(params)[0]))
    out = {f"validation/{task}/{k}": float(v) for task, r in result["validation"].items()
           if isinstance(r, dict) for k, v in r.items() if k != "pairs"}
    if result["validation"]["mean_recall@10"] is not None:
      out["validation/mean_recall@10"] = float(result["validation"]["mean_recall@10"])
    out.update({f"wands/{k}": float(v) for k, v in result["wands"].items()})
    return out


# --- evaluation ------------------------------------------------------------------------------
def validation(config, prepared: str, table: np.ndarray) -> dict:
  """Per task: each validation pair's positive ranked by cosine against `val_candidates` random
  catalogue items (seeded, the positive excluded); Recall@10 and MRR. The model-selection signal
  for mu/rho/gamma (WANDS is never used for it)."""
  out = {}
  rng = np.random.default_rng(config.seed + 17)
  n_cand = config.eval.val_candidates
  for task in config.tasks:
    pairs = pintext_pairs.read_pairs(prepared, "val", task, config.data.query_len)
    catalogue = pintext_pairs.read_catalogue(prepared, task, config.data.item_len)
    rows = pairs["item_row"]
    if not len(rows):
      out[task] = {"pairs": 0}
      continue
    cand = rng.integers(0, len(catalogue) - 1, (len(rows), n_cand))
    cand = cand + (cand >= rows[:, None])   # uniform over the catalogue minus the positive
    q = require_finite(f"{task} query", np.asarray(average(table, pairs["query"])))
    items = require_finite(f"{task} item", np.asarray(average(table, catalogue)))
    pos = np.asarray(margin_loss.cosine(q, items[rows]))
    neg = np.asarray(margin_loss.cosine(q[:, None], items[cand]))
    rank = ranks_of(pos, neg)
    out[task] = {"pairs": len(rows), "recall@10": round(float(np.mean(rank <= 10)), 4),
                 "mrr": round(float(np.mean(1.0 / rank)), 4)}
  scored = [v["recall@10"] for v in out.values() if "recall@10" in v]
  out["mean_recall@10"] = round(float(np.mean(scored)), 4) if scored else None
  return out


def ranks_of(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """1 + #candidates scoring >= the positive; a non-finite score ranks last (a NaN positive gets
  the last rank, a NaN candidate beats nothing)."""
  neg = np.where(np.isfinite(neg), neg, -np.inf)
  rank = 1 + np.sum(neg >= pos[:, None], axis=1)
  return np.where(np.isfinite(pos), rank, neg.shape[1] + 1)


def knn_loo_precision_at_1(vectors: np.ndarray, labels: list) -> dict:
  """Leave-one-out 1-NN classification by cosine (exact); ties -> lowest index."""
  x = require_finite("query", np.asarray(vectors, np.float64))
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)   # zero rows stay zero
  scores = x @ x.T
  np.fill_diagonal(scores, -np.inf)
  nearest = np.argmax(scores, axis=1)
  labels = np.asarray(labels, object)
  hit = labels[nearest] == labels
  _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
  answerable = counts[inverse] >= 2
  return {"queries": len(labels), "precision@1": round(float(hit.mean()), 4),
          "answerable": int(answerable.sum()),
          "precision@1_answerable": round(float(hit[answerable].mean()), 4),
          "nearest": nearest}


def wands_eval(prepared: str, embedder: TextEmbedder) -> dict:
  queries, classes = pintext_pairs.read_wands(prepared)
  result = knn_loo_precision_at_1(embedder.embed(queries), classes)
  result.pop("nearest")
  return {**result, **embedder.coverage(queries)}
