"""Parallel layout and ZeRO-1 partitioning (process groups are created by the trainer from ParallelLayout)."""

from train_kernel.parallel.zero_partition import (
    LayoutError,
    ParallelLayout,
    PartitionError,
    RankCoords,
    partition_ranges,
    partition_sizes,
    stage_layer_ranges,
)

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "PartitionError",
    "RankCoords",
    "partition_ranges",
    "partition_sizes",
    "stage_layer_ranges",
]
