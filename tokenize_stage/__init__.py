"""Raw text -> token shards (Apache Arrow). Public contract: :mod:`tokenize_stage.schema`."""
