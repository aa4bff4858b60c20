"""One pipeline stage of InternLM: the layers partition_uniform gives the stage, the embedding on the
first stage, the final norm and the head on the last. With model.num_chunks > 1 (the interleaved
schedule) a stage holds one such part per chunk (StageChunks).

The full model is built on the meta device (no memory), pruned, then materialised and initialised:
InternLM.init_weights seeds every tensor from (seed, key name), so a stage holds exactly the tensors
of the full model under the same global key names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from train_kernel.data.batches import MicroBatch
from train_kernel.model.config import ModelConfig
from train_kernel.model.internlm import InternLM
from train_kernel.parallel.layout import LayoutError, stage_layer_ranges

# The loss a pipeline's last piece computes: (that piece's model, its final hidden states, the
# micro-batch) -> the micro-batch's share of the step loss, a scalar tensor. The schedules take it
# from the caller (the trainer's step_schedule.py): they move tensors between stages and never
# need to know what the loss is or which metrics it feeds.
StageLoss = Callable[[nn.Module, torch.Tensor, MicroBatch], torch.Tensor]
# Cuts a model part on the meta device for this tensor rank (tensor_parallel.tensor_cutter).
Shard = Callable[[InternLM], None]


def stage_layers(config: ModelConfig, stage: int, num_stages: int) -> list[range]:
    """Global indices of the layers `stage` owns, one range per model chunk (model.num_chunks)."""
    return [
        range(start, end)
        for start, end in stage_layer_ranges(config.num_layers, num_stages, config.num_chunks)[stage]
    ]


def _prune(model: InternLM, layers: range, has_embedding: bool, has_head: bool) -> InternLM:
    """Drops (in place) the layers outside `layers`, and the embedding / final norm and head when
    this part of the model does not hold them; returns the model."""
    keep = {str(i) for i in layers}
    for key in [key for key in model.layers if key not in keep]:
        del model.layers[key]
    if not has_embedding:
        model.embedding = None
    if not has_head:
        model.norm = None
        model.head = None
    return model


def _build_part(
    config: ModelConfig,
    layers: range,
    has_embedding: bool,
    has_head: bool,
    device: torch.device | str,
    seed: int | None,
    shard: Shard | None = None,
) -> InternLM:
    with torch.device("meta"):
        model = InternLM(config)
    _prune(model, layers, has_embedding, has_head)
    if shard is not None:  # tensor parallelism: cut on the meta device, before any memory
        shard(model)
    model.materialize(device, seed)
    return model


def build_stage(
    config: ModelConfig,
    stage: int,
    num_stages: int,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    shard: Shard | None = None,
) -> InternLM:
    """The model of pipeline stage `stage` of `num_stages` (one chunk per stage), initialised like
    the full model's tensors (seed=None draws from the global RNG instead, and then stages differ
    from the full model)."""
    if config.num_chunks != 1:
        raise LayoutError(
            f"model.num_chunks {config.num_chunks}: build_stage makes one chunk; use build_stage_chunks",
            key="model.num_chunks",
        )
    (layers,) = stage_layers(config, stage, num_stages)
    return _build_part(config, layers, stage == 0, stage == num_stages - 1, device, seed, shard)


class StageChunks(nn.Module):
    """The model chunks of one stage of the interleaved schedule: chunk k holds the k-th layer range
    of the stage; the embedding is in chunk 0 of stage 0, the final norm and head in the last chunk
    of the last stage."""

    def __init__(self, config: ModelConfig, chunks: list[InternLM]) -> None:
        super().__init__()
        self.config = config
        self.chunks = nn.ModuleList(chunks)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The chunks' entries under the full model's key names (what the stage's weight file holds)."""
        state: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            state.update(chunk.state_dict())
        return state


def build_stage_chunks(
    config: ModelConfig,
    stage: int,
    num_stages: int,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    shard: Shard | None = None,
) -> StageChunks:
    """Stage `stage` of `num_stages` for the interleaved schedule (any model.num_chunks >= 1)."""
    ranges = stage_layers(config, stage, num_stages)
    last_chunk = len(ranges) - 1
    chunks = [
        _build_part(
            config,
            layers,
            stage == 0 and k == 0,
            stage == num_stages - 1 and k == last_chunk,
            device,
            seed,
            shard,
        )
        for k, layers in enumerate(ranges)
    ]
    return StageChunks(config, chunks)


def activation_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype of the hidden states passed between stages: the residual stream's (fp32 with
    pre-norm blocks and residual_in_fp32; the model dtype otherwise)."""
    if config.residual_in_fp32 and not config.apply_post_layer_norm:
        return torch.float32
    return config.torch_dtype
