"""Model FLOPs per step and TFLOPS, exactly as InternLM's `get_megatron_flops` reports them.

The formula (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", SC'21), with B the global batch in sequences, s the sequence length, h the hidden size,
L the layers, V the vocabulary:

    factor = 4 if activation checkpointing else 3      (forward + backward (2x) [+ recomputed forward])
    r      = mlp_ratio * 3/2 with SwiGLU                (three matrices of mlp_ratio * h instead of two)
    flops  = factor * ((8 + 4 r) * B s h^2 + 4 B s^2 h) * L + 6 B s h V

8 B s h^2: the q, k, v and output projections; 4 r B s h^2: the MLP; 4 B s^2 h: the attention scores and
the weighted sum (counted in full, as InternLM does, even though a causal mask halves the work);
6 B s h V: the output head, forward and backward (InternLM does not recompute it).
Note that InternLM uses mlp_ratio as written (8/3), not the MLP size rounded up to a multiple of 256.
With the seed 7B config on 8 GPUs (B = 64, s = 2048) and its logged step time of 3.92 s this gives the
logged ~185.6 TFLOPS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train_kernel.config import TrainConfig


def megatron_flops_per_step(
    *,
    global_batch_size: int,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    mlp_ratio: float,
    checkpoint: bool | float = False,
    use_swiglu: bool = True,
) -> float:
    """FLOPs of one optimizer step over the whole job (InternLM's get_megatron_flops times its denominator).

    `global_batch_size` is in sequences of `seq_len` tokens (micro_bsz * micro_num * data-parallel size);
    `checkpoint` counts as on when truthy (InternLM passes model.checkpoint, so a fraction > 0 is "on").
    """
    checkpoint_activations_factor = 4 if checkpoint else 3
    if use_swiglu:
        mlp_ratio = mlp_ratio * 3 / 2
    b, s, h = global_batch_size, seq_len, hidden_size
    return (
        checkpoint_activations_factor * ((8 + mlp_ratio * 4) * b * s * h**2 + 4 * b * s**2 * h) * num_layers
        + 6 * b * s * h * vocab_size
    )


def tflops(flops_per_step: float, step_seconds: float, world_size: int) -> float:
    """Achieved TFLOPS per device: flops_per_step / (step_seconds * world_size * 1e12)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return flops_per_step / (step_seconds * world_size * 10**12)


def flops_per_step(config: TrainConfig, data_parallel_size: int, micro_num: int | None = None) -> float:
    """megatron_flops_per_step for a config: B = micro_bsz * micro_num * data_parallel_size sequences.

    `micro_num` defaults to data.micro_num (pass data.micro_num_at(step) during a batch-size ramp-up).
    """
    data, model = config.data, config.model
    return megatron_flops_per_step(
        global_batch_size=data.micro_bsz
        * (data.micro_num if micro_num is None else micro_num)
        * data_parallel_size,
        seq_len=data.seq_len,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        vocab_size=model.vocab_size,
        mlp_ratio=model.mlp_ratio,
        checkpoint=model.checkpoint,
    )
