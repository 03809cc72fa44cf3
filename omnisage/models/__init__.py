"""omnisage.models: the towers of OmniSearchSage (SPEC §1) and their builders.

Usage:
  from omnisage.models import build_model
  model = build_model(config, {"query": query_vocab_size, "ngram": ngram_vocab_size})
"""

from omnisage.models.compat import compat_query, l2_normalize, legacy_embedding
from omnisage.models.entity_tower import CONTINUOUS_DIM, EntityTower
from omnisage.models.hash_embedding import HashEmbedding, HashIndices, hash_index_table
from omnisage.models.hf_import import CheckpointError, load_hf_checkpoint, query_tower_from_config
from omnisage.models.omnisearchsage import OmniSearchSage, build_model
from omnisage.models.query_tower import QueryConfig, QueryTower

__all__ = [
    "CONTINUOUS_DIM", "CheckpointError", "EntityTower", "HashEmbedding", "HashIndices",
    "OmniSearchSage", "QueryConfig", "QueryTower", "build_model", "compat_query",
    "hash_index_table", "l2_normalize", "legacy_embedding", "load_hf_checkpoint",
    "query_tower_from_config",
]
