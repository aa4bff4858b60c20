"""Parallel layout (layout.py), ZeRO-1 partitioning (zero_partition.py); the process groups are a
DeviceMesh over the layout (process_groups.py)."""

from train_kernel.parallel.layout import LayoutError, ParallelLayout, RankCoords, stage_layer_ranges
from train_kernel.parallel.zero_partition import PartitionError, partition_ranges, partition_sizes

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "PartitionError",
    "RankCoords",
    "partition_ranges",
    "partition_sizes",
    "stage_layer_ranges",
]
