"""The config's rules for tensor parallelism (parallel.tensor > 1): every size the split cuts must
divide by the tensor size. Checked when the config loads, before any process group exists, so a
misconfigured job stops on every rank with the same message naming the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from train_kernel.config.errors import ConfigError

if TYPE_CHECKING:
    from train_kernel.config.sections import ParallelConfig
    from train_kernel.model.config import ModelConfig


def check_tensor_parallel(model: ModelConfig, parallel: ParallelConfig, seq_len: int) -> None:
    size = parallel.tensor.size
    if size == 1:
        return
    cuts = [
        ("model.num_attention_heads", model.num_attention_heads, "attention heads are split over the ranks"),
        ("model.num_kv_attention_heads", model.kv_heads, "key/value heads are split over the ranks"),
        ("model.vocab_size", model.vocab_size, "the head (and the embedding) is split along the vocabulary"),
        ("model.mlp_ratio", model.mlp_hidden_size, "the MLP hidden size is split over the ranks"),
    ]
    if model.embed_split_hidden:
        why = "embed_split_hidden splits the embedding along the hidden size"
        cuts.append(("model.hidden_size", model.hidden_size, why))
    if parallel.sequence_parallel:
        cuts.append(("data.seq_len", seq_len, "sequence_parallel splits every packed row along its tokens"))
    for key, value, why in cuts:
        if value % size:
            raise ConfigError(f"{value} is not divisible by parallel.tensor.size {size} ({why})", key=key)
    if parallel.sequence_parallel and parallel.pipeline.size > 1:
        raise ConfigError(
            "sequence_parallel with pipeline size > 1 is not run yet (stages send whole rows); "
            "use sequence_parallel=False or pipeline size 1",
            key="parallel.sequence_parallel",
        )
