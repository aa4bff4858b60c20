"""Where each parameter lies in a stage's flat optimizer vector: the index a checkpoint keeps next
to the ZeRO slices (optimizer_index_tp{t}_pp{p}.json), so its optimizer state can be re-cut for
any other layout (pipeline size, num_chunks, ZeRO size, and tensor shards: each entry names the
full-model parameter, its full shape and the box of it that the shard holds).

Checkpoints written before the index existed are read through `derived_index`: a stage's flat
order is the full model's parameter order restricted to the stage's parameters (stages and their
chunks hold increasing layer ranges, the embedding first, the norm and head last)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .manifest import CheckpointError
from .model_state import parameter_names

Box = tuple[tuple[int, int], ...]  # [start, stop) along each dimension of the full tensor


@dataclass(frozen=True)
class ParamSpan:
    name: str  # the full model's key name
    offset: int  # first element in the stage's flat vector
    shape: tuple[int, ...]  # this shard's shape (the full shape without tensor parallelism)
    full_shape: tuple[int, ...]
    box: Box  # which part of the full tensor the shard holds

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def whole(self) -> bool:
        return self.shape == self.full_shape


@dataclass(frozen=True)
class StageIndex:
    """One stage's (one tensor rank's) flat vector: its parameters in order and the ZeRO slices."""

    numel: int
    ranges: tuple[tuple[int, int], ...]  # [start, end) of each ZeRO rank's file
    params: tuple[ParamSpan, ...]

    def to_json(self) -> dict:
        return {
            "numel": self.numel,
            "ranges": [list(r) for r in self.ranges],
            "params": [
                {
                    "name": p.name,
                    "offset": p.offset,
                    "shape": list(p.shape),
                    "full_shape": list(p.full_shape),
                    "box": [list(b) for b in p.box],
                }
                for p in self.params
            ],
        }

    @staticmethod
    def from_json(body: dict, source: str) -> StageIndex:
        try:
            params = tuple(
                ParamSpan(
                    str(p["name"]),
                    int(p["offset"]),
                    tuple(int(s) for s in p["shape"]),
                    tuple(int(s) for s in p["full_shape"]),
                    tuple((int(lo), int(hi)) for lo, hi in p["box"]),
                )
                for p in body["params"]
            )
            index = StageIndex(
                int(body["numel"]), tuple((int(lo), int(hi)) for lo, hi in body["ranges"]), params
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: unreadable optimizer index ({error})") from error
        if sum(p.numel for p in params) != index.numel:
            raise CheckpointError(f"{source}: its parameters do not add up to its {index.numel:,} elements")
        return index


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(s)) for s in shape)


def shard_of(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], Box]:
    """This rank's shape of `param`, the full shape, and the box of the full tensor it holds. A
    plain tensor is whole; a DTensor (tensor parallelism) holds what its placements give this rank."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        # NOTE: private torch helper; the one place that turns placements into an offset, kept here.
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        full = tuple(param.shape)
        local, offset = compute_local_shape_and_global_offset(full, param.device_mesh, param.placements)
        local = tuple(int(s) for s in local)
        return local, full, tuple((int(o), int(o) + s) for o, s in zip(offset, local))
    shape = tuple(int(s) for s in param.shape)
    return shape, shape, full_box(shape)


def stage_index(
    model: nn.Module, params: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int]]
) -> StageIndex:
    """The index of the flat vector the optimizer built from `params` (in that order)."""
    names = parameter_names(model)
    spans, offset = [], 0
    for param in params:
        name = names.get(id(param))
        if name is None:
            raise CheckpointError("an optimized parameter is not a parameter of the model (cannot name it)")
        # A tensor-parallel shard (parallel/tensor_parallel.py) names its blocks of the full tensor.
        pieces = getattr(param, "tensor_pieces", None)
        if pieces is not None:
            for piece in pieces:
                spans.append(ParamSpan(name, offset + piece.offset, piece.shape, param.full_shape, piece.box))
            offset += param.numel()
            continue
        local, full, box = shard_of(param)
        spans.append(ParamSpan(name, offset, local, full, box))
        offset += _numel(local)
    return StageIndex(offset, tuple((int(lo), int(hi)) for lo, hi in ranges), tuple(spans))


def derived_index(
    full_order: Sequence[tuple[str, tuple[int, ...]]],
    stage_names: set[str],
    ranges: Sequence[tuple[int, int]],
) -> StageIndex:
    """The index of a stage of a checkpoint that predates it (no tensor parallelism then):
    `full_order` is the whole model's (name, shape) in parameter order, `stage_names` the keys of
    the stage's weight file."""
    spans, offset = [], 0
    for name, shape in full_order:
        if name in stage_names:
            spans.append(ParamSpan(name, offset, shape, shape, full_box(shape)))
            offset += _numel(shape)
    return StageIndex(offset, tuple(ranges), tuple(spans))


def index_bytes(index: StageIndex) -> bytes:
    return json.dumps(index.to_json(), indent=1).encode()
