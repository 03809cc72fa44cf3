"""OmniSearchSage input (SPEC §1): raw tables -> prepared shards (prepare.py, features.py), the
on-disk contract (schema.py), the synthetic world (synthetic.py), the training input (examples
that carry their features: feature_examples.py, feature_pipeline.py) and the in-memory catalogue
the evaluators and mining read (pipeline.py, entity_store.py)."""
