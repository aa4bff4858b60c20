"""The ZeRO-1 partition of a pipeline stage's flattened parameters: which contiguous slice of the
flat vector each rank of a ZeRO group owns (the layout of the groups is parallel/layout.py)."""

from __future__ import annotations


class PartitionError(ValueError):
    """partition_sizes was called with impossible sizes (a bug in the caller, not a user error)."""


def partition_sizes(total_elements: int, zero_size: int, align: int = 1) -> list[int]:
    """Elements of the flattened parameter vector owned by each of the `zero_size` ranks of a ZeRO group.

    Rank r owns the contiguous slice [sum(sizes[:r]), sum(sizes[:r + 1])). With align = 1 (the default)
    the split is as even as it gets: sizes differ by at most one element, the first
    `total_elements % zero_size` ranks holding the extra one. With align = a > 1 every slice but the
    last starts and ends on a multiple of a elements (the last one takes the remainder); sizes then
    differ by at most a elements.
    """
    if zero_size < 1:
        raise PartitionError(f"zero_size must be >= 1, got {zero_size}")
    if total_elements < 0:
        raise PartitionError(f"total_elements must be >= 0, got {total_elements}")
    if align < 1:
        raise PartitionError(f"align must be >= 1, got {align}")
    units, tail = divmod(total_elements, align)
    if tail:
        units += 1
    base, extra = divmod(units, zero_size)
    sizes = [(base + (1 if rank < extra else 0)) * align for rank in range(zero_size)]
    # Aligned units overshoot the total by align - tail elements: the last non-empty slice gives them back.
    overshoot = sum(sizes) - total_elements
    for rank in reversed(range(zero_size)):
        if overshoot == 0:
            break
        take = min(overshoot, sizes[rank])
        sizes[rank] -= take
        overshoot -= take
    return sizes


def partition_ranges(total_elements: int, zero_size: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each rank's slice, from partition_sizes."""
    ranges = []
    start = 0
    for size in partition_sizes(total_elements, zero_size, align):
        ranges.append((start, start + size))
        start += size
    return ranges
