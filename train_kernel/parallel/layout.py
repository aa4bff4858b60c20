"""The parallel layout: world = data x pipeline x tensor, ZeRO-1 groups inside data parallel, and
which layers each pipeline stage holds.

Rank order is InternLM's: tensor-parallel ranks are adjacent, then data parallel, then pipeline:
    rank = pipeline_rank * (data * tensor) + data_rank * tensor + tensor_rank
and a ZeRO-1 group is a slice of `zero` consecutive data-parallel ranks:
    zero_rank = data_rank % zero, zero_group = data_rank // zero.
The process groups (parallel/process_groups.py) are a DeviceMesh in this order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from train_kernel.config.errors import ConfigError
from train_kernel.config.rules import check_stage_partition

if TYPE_CHECKING:
    from train_kernel.config.sections import ParallelConfig


class LayoutError(ConfigError):
    """The parallel sizes do not fit the world size (or each other)."""


def stage_layer_ranges(
    num_layers: int, pipeline_size: int, num_chunks: int = 1
) -> list[list[tuple[int, int]]]:
    """InternLM's `partition_uniform`: the [start, end) layer ranges of each pipeline stage, one per
    model chunk. Within a chunk, later stages take the extra layers when they do not split evenly.
    The sizes are the config's, checked there (config/rules.py: check_model, and
    check_stage_partition, which is also called here for plans and stages built without a config)."""
    check_stage_partition(num_layers, pipeline_size, num_chunks, error=LayoutError)
    per_chunk = num_layers // num_chunks
    parts: list[list[tuple[int, int]]] = [[] for _ in range(pipeline_size)]
    chunk_size, remainder = divmod(per_chunk, pipeline_size)
    left = pipeline_size - remainder
    for chunk in range(num_chunks):
        start = chunk * per_chunk
        for stage in range(pipeline_size):
            end = start + chunk_size + (1 if stage >= left else 0)
            parts[stage].append((start, end))
            start = end
    return parts


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the layout."""

    rank: int
    data: int
    pipeline: int
    tensor: int
    zero: int
    zero_group: int


@dataclass(frozen=True)
class ParallelLayout:
    """World size split into data x pipeline x tensor, with ZeRO-1 groups of `zero` data-parallel ranks.

    `zero1` is the config's value (<= 0: all of data parallel; 1: off; k: slices of k); `zero` the
    resulting group size. Raises LayoutError when the sizes do not fit.
    """

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    zero1: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise LayoutError(f"must be an int >= 1, got {self.world_size!r}", key="world_size")
        # tensor, pipeline and zero1 are the config's (parallel.*), checked there.
        assert self.tensor >= 1 and self.pipeline >= 1, (self.tensor, self.pipeline)
        model_parallel = self.tensor * self.pipeline
        if self.world_size % model_parallel:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tensor {self.tensor} x pipeline "
                f"{self.pipeline} = {model_parallel}",
                key="world_size",
            )
        data = self.world_size // model_parallel
        if self.zero1 > data or data % max(self.zero1, 1):
            raise LayoutError(
                f"{self.zero1} does not divide the data-parallel size {data} (world {self.world_size} / "
                f"tensor {self.tensor} / pipeline {self.pipeline}); use a divisor of {data}, "
                "or <= 0 for all of it",
                key="parallel.zero1",
            )

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> ParallelLayout:
        return cls(
            world_size=world_size,
            tensor=parallel.tensor.size,
            pipeline=parallel.pipeline.size,
            zero1=parallel.zero1,
        )

    @property
    def data(self) -> int:
        """Data-parallel size: world / (tensor * pipeline)."""
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def zero(self) -> int:
        """ZeRO-1 group size: the ranks one optimizer state is split over (1 = not split)."""
        return self.data if self.zero1 <= 0 else self.zero1

    @property
    def num_zero_groups(self) -> int:
        """ZeRO-1 groups in each data-parallel group."""
        return self.data // self.zero

    def rank_of(self, data: int = 0, pipeline: int = 0, tensor: int = 0) -> int:
        for name, value, size in (
            ("data", data, self.data),
            ("pipeline", pipeline, self.pipeline),
            ("tensor", tensor, self.tensor),
        ):
            if not 0 <= value < size:
                raise LayoutError(f"{name} rank {value} is outside [0, {size})")
        return pipeline * self.data * self.tensor + data * self.tensor + tensor

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside [0, {self.world_size})")
        pipeline, within_stage = divmod(rank, self.data * self.tensor)
        data, tensor = divmod(within_stage, self.tensor)
        zero_group, zero = divmod(data, self.zero)
        return RankCoords(
            rank=rank, data=data, pipeline=pipeline, tensor=tensor, zero=zero, zero_group=zero_group
        )

    def data_group(self, rank: int) -> list[int]:
        """Ranks that hold the same parameters (same pipeline stage and tensor slice)."""
        c = self.coords(rank)
        return [self.rank_of(data=d, pipeline=c.pipeline, tensor=c.tensor) for d in range(self.data)]

    def zero_group(self, rank: int) -> list[int]:
        """Ranks that split this rank's optimizer state."""
        c = self.coords(rank)
        first = c.zero_group * self.zero
        return [
            self.rank_of(data=d, pipeline=c.pipeline, tensor=c.tensor)
            for d in range(first, first + self.zero)
        ]

    def pipeline_group(self, rank: int) -> list[int]:
        """Ranks of the stages one micro-batch flows through, stage 0 first."""
        c = self.coords(rank)
        return [self.rank_of(data=c.data, pipeline=p, tensor=c.tensor) for p in range(self.pipeline)]

    def tensor_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(data=c.data, pipeline=c.pipeline, tensor=t) for t in range(self.tensor)]

    def describe(self) -> str:
        zero = (
            "off"
            if self.zero == 1
            else f"groups of {self.zero} ({self.num_zero_groups} per data-parallel group)"
        )
        return (
            f"world {self.world_size} = data {self.data} x pipeline {self.pipeline} x tensor {self.tensor}; "
            f"ZeRO-1 {zero}"
        )
