"""omnisage.serving: everything after training, split by concern.

  bundle/    the serving-bundle format: writer helpers and the model-free loader (every system)
  index/     batch embedding, ANN search, auto-tuned ScaNN indexes
  service/   the HTTP service machinery: API contract, micro-batcher, cache, metrics, runner, page
  omnisearchsage/, twotower/, pintext/, pinnersage/   each system's export and HTTP routes"""
