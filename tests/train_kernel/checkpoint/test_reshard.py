"""reshard.py re-cuts ZeRO slices of flat optimizer vectors by parameter name and box: whole
parameters move between stages and ZeRO sizes as ranges, tensor shards are cut out of whole
parameters and put back together (the layouts tensor parallelism will write)."""

from __future__ import annotations

import pytest
import torch

from train_kernel.checkpoint.manifest import CheckpointError
from train_kernel.checkpoint.param_index import ParamSpan, StageIndex, full_box
from train_kernel.checkpoint.reshard import STATES, reshard
from train_kernel.parallel.zero_partition import partition_ranges

# The full model's optimizer state: each state a distinct function of the element.
SHAPES = {"a": (4, 6), "b": (5,), "c": (3, 2)}
FULL = {
    name: {
        s: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) * (k + 1) + 100 * i
        for k, s in enumerate(STATES)
    }
    for i, (name, shape) in enumerate(SHAPES.items())
}


def _stage(pieces: list[tuple[str, tuple[tuple[int, int], ...]]], zero: int):
    """A saved stage holding `pieces` (name, box) in order, cut into `zero` files."""
    spans, flat, offset = [], {s: [] for s in STATES}, 0
    for name, box in pieces:
        index = tuple(slice(lo, hi) for lo, hi in box)
        shape = tuple(hi - lo for lo, hi in box)
        spans.append(ParamSpan(name, offset, shape, SHAPES[name], box))
        for s in STATES:
            flat[s].append(FULL[name][s][index].reshape(-1))
        offset += torch.Size(shape).numel()
    flat = {s: torch.cat(v) for s, v in flat.items()}
    ranges = partition_ranges(offset, zero)
    files = [
        {
            **{s: flat[s][lo:hi].clone() for s in STATES},
            "step": torch.tensor(3.0),
            "scaler": {"scale": 1.0},
            "partition": [lo, hi],
            "numel": offset,
        }
        for lo, hi in ranges
    ]
    return StageIndex(offset, tuple(ranges), tuple(spans)), files


def _read(stages):
    return lambda key, zero: stages[key][1][zero]


def _target(pieces):
    index, _ = _stage(pieces, 1)
    return index


def _want(pieces, start, end):
    flat = {s: [] for s in STATES}
    for name, box in pieces:
        index = tuple(slice(lo, hi) for lo, hi in box)
        for s in STATES:
            flat[s].append(FULL[name][s][index].reshape(-1))
    return {s: torch.cat(v)[start:end] for s, v in flat.items()}


def _whole(name):
    return (name, full_box(SHAPES[name]))


def test_whole_parameters_move_between_stages_and_zero_sizes():
    # Saved: 2 pipeline stages (a | b, c), ZeRO 3; read: one stage (c, a, b) as ZeRO rank 1 of 2.
    stages = {0: _stage([_whole("a")], 3), 1: _stage([_whole("b"), _whole("c")], 3)}
    pieces = [_whole("c"), _whole("a"), _whole("b")]
    new = _target(pieces)
    start, end = partition_ranges(new.numel, 2)[1]
    got = reshard({k: v[0] for k, v in stages.items()}, _read(stages), new, (start, end), "ckpt")
    for s, value in _want(pieces, start, end).items():
        assert torch.equal(got[s], value), s
    assert got["partition"] == [start, end] and got["numel"] == new.numel and float(got["step"]) == 3.0


def test_tensor_shards_are_cut_from_whole_parameters_and_put_back_together():
    whole = {0: _stage([_whole("a"), _whole("b")], 2)}
    # Tensor rank 1 of 2 holds a's rows 2-4 and b's elements 3-5 (column / vocabulary split).
    shard = [("a", ((2, 4), (0, 6))), ("b", ((3, 5),))]
    new = _target(shard)
    got = reshard({k: v[0] for k, v in whole.items()}, _read(whole), new, (0, new.numel), "ckpt")
    for s, value in _want(shard, 0, new.numel).items():
        assert torch.equal(got[s], value), s

    # Back: saved as two tensor ranks splitting a by columns, read whole by ZeRO rank 0 of 3.
    split = {(t, 0): _stage([("a", ((0, 4), (3 * t, 3 * t + 3))), ("b", ((0, 5),))], 2) for t in range(2)}
    pieces = [_whole("a"), _whole("b")]
    new = _target(pieces)
    start, end = partition_ranges(new.numel, 3)[0]
    got = reshard({k: v[0] for k, v in split.items()}, _read(split), new, (start, end), "ckpt")
    for s, value in _want(pieces, start, end).items():
        assert torch.equal(got[s], value), s

    # Tensor 2 to another tensor split: b, replicated on both old ranks, cut in two.
    shard = [("a", ((0, 2), (0, 6))), ("b", ((0, 3),))]
    new = _target(shard)
    got = reshard({k: v[0] for k, v in split.items()}, _read(split), new, (0, new.numel), "ckpt")
    for s, value in _want(shard, 0, new.numel).items():
        assert torch.equal(got[s], value), s


def test_missing_or_reshaped_parameters_are_errors_naming_the_checkpoint():
    saved = {0: _stage([_whole("a")], 1)}
    with pytest.raises(CheckpointError, match="ckpt/4: the optimizer state has no b"):
        new = _target([_whole("b")])
        reshard({0: saved[0][0]}, _read(saved), new, (0, new.numel), "ckpt/4")
    other = StageIndex(24, ((0, 24),), (ParamSpan("a", 0, (6, 4), (6, 4), full_box((6, 4))),))
    with pytest.raises(CheckpointError, match=r"a has shape \(4, 6\) in the optimizer state"):
        reshard({0: saved[0][0]}, _read(saved), other, (0, 24), "ckpt/4")
    # Only half of a's columns were saved (one tensor rank's file lost): not silently zero.
    half = {0: _stage([("a", ((0, 4), (0, 3)))], 1)}
    new = _target([_whole("a")])
    with pytest.raises(CheckpointError, match="covers only part of a"):
        reshard({0: half[0][0]}, _read(half), new, (0, new.numel), "ckpt/4")
