"""The training kernel (InternLM model, mixed precision, ZeRO-1, pipeline parallel)."""
