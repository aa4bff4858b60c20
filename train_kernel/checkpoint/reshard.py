"""Re-cutting a checkpoint's optimizer state for another layout. The saved state is the ZeRO
slices of each stage's flat vector (optimizer_tp{t}_pp{p}_zo{z}.pt); the stage indexes
(param_index.py) say which parameter each element belongs to. This rank's slice of its own flat
vector is rebuilt parameter by parameter, by full-model name: a parameter held whole on both sides
is a plain range of the old flat vector; a tensor shard is cut out of (or put together from) the
old shards by the boxes of the full tensor they hold.

Only the files that hold this rank's elements are read, each once."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch

from .manifest import CheckpointError
from .param_index import Box, ParamSpan, StageIndex

STATES = ("master", "exp_avg", "exp_avg_sq")
# (stage key, ZeRO rank) -> that file's payload (ZeroOptimizer.export_state)
ReadSlice = Callable[[Hashable, int], dict]


class _OldStages:
    def __init__(self, indexes: dict[Hashable, StageIndex], read: ReadSlice, source: str) -> None:
        self.indexes, self.read, self.source = indexes, read, source
        self.files: dict[tuple[Hashable, int], dict] = {}
        self.by_name: dict[str, list[tuple[Hashable, ParamSpan]]] = {}
        for key, index in indexes.items():
            for span in index.params:
                self.by_name.setdefault(span.name, []).append((key, span))

    def file(self, key: Hashable, zero: int) -> dict:
        if (key, zero) not in self.files:
            self.files[(key, zero)] = self.read(key, zero)
        return self.files[(key, zero)]

    def flat(self, key: Hashable, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Elements [lo, hi) of stage `key`'s old flat vector, each state."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in STATES}
        covered = lo
        for zero, (start, end) in enumerate(self.indexes[key].ranges):
            if end <= lo or start >= hi or start == end:
                continue
            payload = self.file(key, zero)
            if list(payload["partition"]) != [start, end]:
                raise CheckpointError(
                    f"{self.source}: optimizer file {zero} of stage {key} holds {payload['partition']}, "
                    f"its index says [{start}, {end})"
                )
            take_lo, take_hi = max(lo, start) - start, min(hi, end) - start
            for name in STATES:
                parts[name].append(payload[name].reshape(-1)[take_lo:take_hi])
            covered = min(hi, end)
        if covered < hi:
            raise CheckpointError(
                f"{self.source}: no optimizer file holds elements [{covered}, {hi}) of stage {key}"
            )
        # One file holds the range in the common case: a view, copied once, into the new slice.
        return {name: _joined(values) for name, values in parts.items()}


def _joined(values: list[torch.Tensor]) -> torch.Tensor:
    if len(values) == 1:
        return values[0]
    return torch.cat(values) if values else torch.zeros(0)


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(alo, blo), min(ahi, bhi)) for (alo, ahi), (blo, bhi) in zip(a, b))
    return box if all(lo < hi for lo, hi in box) else None


def _local(box: Box, origin: Box) -> tuple[slice, ...]:
    return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, origin))


def _param_states(old: _OldStages, span: ParamSpan, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Elements [lo, hi) of `span`'s (flattened) shard, each state, from the old stages."""
    found = old.by_name.get(span.name)
    if not found:
        raise CheckpointError(f"{old.source}: the optimizer state has no {span.name}")
    for _, saved in found:
        if saved.full_shape != span.full_shape:
            raise CheckpointError(
                f"{old.source}: {span.name} has shape {saved.full_shape} in the optimizer state, "
                f"this model's is {span.full_shape} (a checkpoint of another model config)"
            )
    for key, saved in found:
        if saved.box == span.box:  # the same shard (or both whole): a range of the old flat vector
            return old.flat(key, saved.offset + lo, saved.offset + hi)
    # Another tensor split: put the shard together from the old shards that overlap it (a
    # replicated parameter overlaps several times: the mask, not a count, says what is covered).
    shard = {name: torch.empty(span.shape, dtype=torch.float32) for name in STATES}
    covered = torch.zeros(span.shape, dtype=torch.bool)
    for key, saved in found:
        common = _intersect(saved.box, span.box)
        if common is None:
            continue
        states = old.flat(key, saved.offset, saved.offset + saved.numel)
        for name in STATES:
            shard[name][_local(common, span.box)] = states[name].view(saved.shape)[_local(common, saved.box)]
        covered[_local(common, span.box)] = True
    if not bool(covered.all()):
        raise CheckpointError(f"{old.source}: the optimizer state covers only part of {span.name}")
    return {name: value.reshape(-1)[lo:hi] for name, value in shard.items()}


def reshard(
    old_indexes: dict[Hashable, StageIndex],
    read: ReadSlice,
    new: StageIndex,
    partition: tuple[int, int],
    source: str,
) -> dict:
    """This rank's ZeRO payload (ZeroOptimizer.import_state's format) for elements `partition` of
    the flat vector `new`, from a checkpoint whose stages are `old_indexes`."""
    start, end = partition
    old = _OldStages(old_indexes, read, source)
    joined = {name: torch.empty(end - start, dtype=torch.float32) for name in STATES}
    for span in _overlapping(new.params, start, end):
        lo, hi = max(start, span.offset) - span.offset, min(end, span.offset + span.numel) - span.offset
        at = span.offset + lo - start
        for name, value in _param_states(old, span, lo, hi).items():
            joined[name][at : at + hi - lo].copy_(value)
    first = next(iter(old.files.values()), None)
    if first is None:  # an empty slice: the step and the loss scaler still come from the checkpoint
        key = next(iter(old_indexes))
        first = old.file(key, 0)
    return {
        **joined,
        "step": first["step"],
        "scaler": first["scaler"],
        "partition": [start, end],
        "numel": new.numel,
    }


def _overlapping(spans: Iterable[ParamSpan], start: int, end: int) -> Iterable[ParamSpan]:
    return (s for s in spans if s.offset < end and s.offset + s.numel > start)
