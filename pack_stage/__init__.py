"""Token shards -> packed rows of micro_bsz * seq_len tokens. Public contract: :mod:`pack_stage.reader`."""
