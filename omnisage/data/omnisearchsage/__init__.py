"""OmniSearchSage input (SPEC §1): raw tables -> prepared shards (prepare.py, features.py), the
on-disk contract (schema.py), the synthetic world (synthetic.py) and the Grain pipeline
(pipeline.py, entity_store.py)."""
