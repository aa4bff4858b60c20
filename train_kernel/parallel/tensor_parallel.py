"""Tensor parallelism with InternLM's semantics, applied to a built (full, or pipeline-stage) model.

Each tensor rank keeps the rows or columns of the matrices its heads / MLP slice need, as plain
local tensors under the full model's names:
- attention.Wqkv column-parallel by heads: the rank's q heads, and its k and v heads (grouped-query
  attention: the kv heads split too), cut out of the fused [q; k; v] rows; attention runs on them;
- attention.out_proj row-parallel (its bias added once, after the sum);
- mlp.w1 (gate) and mlp.w2 (up) column-parallel, mlp.w3 (down) row-parallel;
- the embedding split along the hidden size (model.embed_split_hidden=True) or the vocabulary;
- the head column-parallel along the vocabulary: the training loss runs on the rank's vocabulary
  slice (train/fused_loss.py; model.parallel_output=False gathers the head's weight instead);
  the head as a module (validation) returns the gathered logits.
- parallel.sequence_parallel: norms and residuals on sequence shards ([B, L/k, h]); the parallel
  regions start with an all-gather along the tokens and end with a reduce-scatter.
- dropout: the attention's (on the rank's heads) and, with sequence parallel, the block's (on token
  shards) draw from a stream forked per tensor rank; on replicated activations every tensor rank
  draws the same mask (parallel/dropout_rng.py).

Why hand-written collectives rather than DTensor's parallelize_module, measured by
bench/bench_dtensor_tp.py (torch 2.13, gloo): DTensor runs every style here and matches one process,
but the parameters must stay plain tensors: ZeRO-1 (optim/hybrid_adamw.py) and the overlapped reducers
stop at torch.cat on DTensor parameters ("mixed torch.Tensor and DTensor"), and with every parameter a
DTensor the flat master becomes the whole model on each rank. The fused Wqkv's head-group cut
([q; k; v] rows, three pieces) is no single Shard placement without a tensor-size-dependent regroup of
the rows; the MLP's fused gate/up GEMM makes DTensor all-gather w1 and w2 every step; and DTensor costs
about 8 ms per layer per forward + backward on this CPU, for no faster step.
Sequence parallel's reduce-scatter is reduce_scatter_tensor on every backend (torch 2.13's gloo has
it), so the CPU tests run the collectives NCCL runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train_kernel.model.config import ModelConfig
from train_kernel.model.internlm import InternLM
from train_kernel.parallel.dropout_rng import use_tensor_dropout_streams


@dataclass(frozen=True)
class TensorGroup:
    group: dist.ProcessGroup
    rank: int
    size: int
    sequence_parallel: bool = False


# --- collectives with their autograd duals -------------------------------------------------


def _all_reduce(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=tg.group)
    return x


def _all_gather(x: torch.Tensor, dim: int, tg: TensorGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tg.size)]
    dist.all_gather(parts, x.contiguous(), group=tg.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tg: TensorGroup) -> torch.Tensor:
    # The reduce-scatter splits along dim 0 into rank-ordered chunks: `dim` moved there. Gloo has it
    # too in torch 2.13 (built on its all-reduce; bench_dtensor_tp: as fast as an all-reduce and a
    # slice), so the CPU tests run the call NCCL takes.
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // tg.size, *moved.shape[1:]))
    _reduce_scatter_function()(out, moved, group=tg.group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_function() -> Callable[..., object]:
    """torch 2.13 renamed reduce_scatter_tensor reduce_scatter_single (the old name warns, a
    FutureWarning in every rank's log); torch before it has only the old name. Looked up per call,
    so a benchmark that wraps the collective by name sees it."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _slice(x: torch.Tensor, dim: int, tg: TensorGroup) -> torch.Tensor:
    return x.chunk(tg.size, dim=dim)[tg.rank].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Entering a parallel region: the same input on every rank; the input gradient is summed."""

    @staticmethod
    def forward(ctx, x, tg):
        ctx.tg = tg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tg), None


class _ReduceFromRegion(torch.autograd.Function):
    """Leaving a row-parallel region: partial outputs summed; the gradient passes as it is."""

    @staticmethod
    def forward(ctx, x, tg):
        return _all_reduce(x, tg)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherAlong(torch.autograd.Function):
    """Forward all-gather along `dim`; backward: the rank's slice of the gradient, summed over the
    ranks first when the ranks' gradients differ (`reduce`: sequence parallel's reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, tg, reduce):
        ctx.dim, ctx.tg, ctx.reduce = dim, tg, reduce
        return _all_gather(x, dim, tg)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce:
            return _reduce_scatter(grad, ctx.dim, ctx.tg), None, None, None
        return _slice(grad, ctx.dim, ctx.tg), None, None, None


class _ScatterAlong(torch.autograd.Function):
    """Forward: the rank's slice along `dim`, summed over the ranks first when `reduce`
    (reduce-scatter); backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, tg, reduce):
        ctx.dim, ctx.tg = dim, tg
        return _reduce_scatter(x, dim, tg) if reduce else _slice(x, dim, tg)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.tg), None, None, None


SEQ_DIM = 1  # hidden states are [B, L, h]; sequence parallel shards L (the packed row's tokens)


def enter_region(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    if tg.sequence_parallel:
        return _GatherAlong.apply(x, SEQ_DIM, tg, True)
    return _CopyToRegion.apply(x, tg)


def leave_region(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    if tg.sequence_parallel:
        return _ScatterAlong.apply(x, SEQ_DIM, tg, True)
    return _ReduceFromRegion.apply(x, tg)


def copy_to_region(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    return _CopyToRegion.apply(x, tg)


def gather_vocab(weight: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    """The whole head weight from the ranks' vocabulary rows; the gradient: this rank's rows."""
    return _GatherAlong.apply(weight, 0, tg, False)


def gather_last_dim(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    return _GatherAlong.apply(x, x.dim() - 1, tg, False)


# --- sharded modules ------------------------------------------------------------------------


Box = tuple[tuple[int, int], ...]  # [start, stop) along each dimension of the full tensor


@dataclass(frozen=True)
class Piece:
    """A block of the full tensor this rank holds: `box` of the full tensor, stored flat at
    elements [offset, offset + numel) of the local shard (the fused Wqkv holds three: q, k, v)."""

    offset: int
    shape: tuple[int, ...]
    box: Box


def _mark_sharded(param: nn.Parameter, full_shape: tuple[int, ...], dim: int, ranges) -> nn.Parameter:
    """Marks `param` as this rank's shard of a tensor of `full_shape`: the [start, stop) `ranges`
    along `dim`, in order. Its gradient norm is summed over the tensor group; checkpoints name its
    pieces (param.tensor_pieces) and hold the full tensor (gathered by state_dict)."""
    param.tensor_sharded = True
    param.full_shape = tuple(full_shape)
    pieces, offset = [], 0
    for start, stop in ranges:
        shape = list(full_shape)
        shape[dim] = stop - start
        box = tuple((start, stop) if d == dim else (0, n) for d, n in enumerate(full_shape))
        pieces.append(Piece(offset, tuple(shape), box))
        offset += math.prod(shape)
    param.tensor_pieces = tuple(pieces)
    return param


def _range(part: slice) -> list[tuple[int, int]]:
    return [(part.start, part.stop)]


def gather_full(param: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    """The full tensor of a sharded parameter (every rank's pieces in place, summed: they are
    disjoint). A collective: every rank of the tensor group calls it."""
    full = torch.zeros(param.full_shape, dtype=param.dtype, device=param.device)
    flat = param.detach().reshape(-1)
    for piece in param.tensor_pieces:
        full[_box_slices(piece.box)] = flat[piece.offset : piece.offset + math.prod(piece.shape)].view(
            piece.shape
        )
    dist.all_reduce(full, group=tg.group)
    return full


def shard_of_full(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard (param's shape) cut out of the full tensor."""
    return torch.cat([full[_box_slices(p.box)].reshape(-1) for p in param.tensor_pieces]).view(param.shape)


def _box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W[:, cols]^T, + bias (replicated, added once after the sum)."""

    def __init__(self, linear: nn.Linear, cols: slice, tg: TensorGroup) -> None:
        super().__init__()
        self.tg = tg
        full = tuple(linear.weight.shape)
        self.weight = _mark_sharded(
            nn.Parameter(linear.weight.detach()[:, cols].clone()), full, 1, _range(cols)
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = leave_region(F.linear(x, self.weight), self.tg)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """embed_split_hidden=False: this rank's vocabulary rows; other ids look up zeros, then the sum."""

    def __init__(self, embedding: nn.Embedding, rows: slice, tg: TensorGroup) -> None:
        super().__init__()
        self.tg, self.start, self.stop = tg, rows.start, rows.stop
        full = tuple(embedding.weight.shape)
        self.weight = _mark_sharded(
            nn.Parameter(embedding.weight.detach()[rows].clone()), full, 0, _range(rows)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return leave_region(out, self.tg)


class HiddenSplitEmbedding(nn.Module):
    """embed_split_hidden=True: this rank's columns of every embedding row, then the all-gather."""

    def __init__(self, embedding: nn.Embedding, cols: slice, tg: TensorGroup) -> None:
        super().__init__()
        self.tg = tg
        full = tuple(embedding.weight.shape)
        self.weight = _mark_sharded(
            nn.Parameter(embedding.weight.detach()[:, cols].clone()), full, 1, _range(cols)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = gather_last_dim(F.embedding(ids, self.weight), self.tg)
        if self.tg.sequence_parallel:
            out = _ScatterAlong.apply(out, SEQ_DIM, self.tg, False)
        return out


@dataclass(frozen=True)
class VocabShard:
    """What the fused loss needs to know about a vocabulary-parallel head weight."""

    tg: TensorGroup
    start: int  # first vocabulary id of this rank's rows
    vocab_size: int  # the full vocabulary
    parallel_output: bool  # False: the loss gathers the weight (the whole vocabulary on every rank)


class VocabParallelHead(nn.Module):
    """The head's rows of this rank's vocabulary slice. As a module it returns the gathered logits
    [..., vocab] (validation); the training loss reads `weight.vocab_shard` and stays parallel."""

    def __init__(self, head: nn.Linear, rows: slice, tg: TensorGroup, parallel_output: bool) -> None:
        super().__init__()
        self.tg = tg
        full = tuple(head.weight.shape)
        self.weight = _mark_sharded(nn.Parameter(head.weight.detach()[rows].clone()), full, 0, _range(rows))
        self.weight.vocab_shard = VocabShard(tg, rows.start, head.weight.shape[0], parallel_output)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(F.linear(copy_to_region(h, self.tg), self.weight), self.tg)


# --- the transformation -----------------------------------------------------------------------


def _part(size: int, tg: TensorGroup) -> slice:
    step = size // tg.size
    return slice(tg.rank * step, (tg.rank + 1) * step)


def qkv_rows(config: ModelConfig, tg: TensorGroup) -> list[tuple[int, int]]:
    """The [start, stop) blocks of fused Wqkv rows this rank keeps: its q heads, then its k and
    v heads (grouped-query attention: its share of the kv heads)."""
    d, heads, kv = config.head_dim, config.num_attention_heads, config.kv_heads
    q, k = _part(heads, tg), _part(kv, tg)
    return [
        (q.start * d, q.stop * d),
        ((heads + k.start) * d, (heads + k.stop) * d),
        ((heads + kv + k.start) * d, (heads + kv + k.stop) * d),
    ]


def _shard_rows(linear: nn.Linear, rows: list[tuple[int, int]]) -> None:
    """Column-parallel: this rank's output rows (and bias entries) of `linear`."""
    for name in ("weight", "bias"):
        value = getattr(linear, name)
        if value is not None:
            full = tuple(value.shape)
            # Slices, not an index tensor: the same code cuts a model on the meta device.
            local = torch.cat([value.detach()[lo:hi] for lo, hi in rows])
            setattr(linear, name, _mark_sharded(nn.Parameter(local.clone()), full, 0, rows))


def _enter_hook(tg: TensorGroup):
    def hook(module, args):
        return (enter_region(args[0], tg), *args[1:])

    return hook


def _leave_sequence_hook(tg: TensorGroup):
    # Backward: the slice only. The head's loss hands every rank the whole rows' gradient (the
    # vocabulary-parallel loss sums its shares itself), so there is nothing left to sum.
    def hook(module, args, output):
        return _GatherAlong.apply(output, SEQ_DIM, tg, False)

    return hook


def apply_tensor_parallel(model: InternLM, config: ModelConfig, tg: TensorGroup) -> InternLM:
    """Shards `model` (the full model or a pipeline stage, initialised as the full model) in place
    for tensor rank tg.rank and returns it."""
    cut_for_tensor_parallel(model, config, tg)
    _finish(model, tg)
    return model


def cut_for_tensor_parallel(model: InternLM, config: ModelConfig, tg: TensorGroup) -> None:
    """The structural part of the shard: modules replaced, parameters cut to this rank's pieces
    (marked with their pieces of the full tensor), hooks on modules. Works on the meta device:
    the builders cut before materialising, so no rank ever holds the whole model; init_weights then
    draws each full tensor from its own seed and keeps the rank's pieces (the same values as one
    process)."""
    d = config.head_dim
    for layer in model.layers.values():
        attn = layer.attention
        _shard_rows(attn.Wqkv, qkv_rows(config, tg))
        heads = _part(config.num_attention_heads, tg)
        attn.out_proj = RowParallelLinear(attn.out_proj, slice(heads.start * d, heads.stop * d), tg)
        attn.num_heads //= tg.size
        attn.kv_heads //= tg.size
        attn.register_forward_pre_hook(_enter_hook(tg))
        mlp = layer.mlp
        inner = _part(config.mlp_hidden_size, tg)
        _shard_rows(mlp.w1, _range(inner))
        _shard_rows(mlp.w2, _range(inner))
        mlp.w3 = RowParallelLinear(mlp.w3, inner, tg)
        mlp.register_forward_pre_hook(_enter_hook(tg))
    if model.embedding is not None:
        if config.embed_split_hidden:
            model.embedding = HiddenSplitEmbedding(model.embedding, _part(config.hidden_size, tg), tg)
        else:
            model.embedding = VocabParallelEmbedding(model.embedding, _part(config.vocab_size, tg), tg)
    if model.head is not None:
        model.head = VocabParallelHead(model.head, _part(config.vocab_size, tg), tg, config.parallel_output)
    for module in model.modules():
        if any(getattr(p, "tensor_sharded", False) for p in module.parameters(recurse=False)):
            module.register_state_dict_post_hook(_full_state_hook(tg))
            module.register_load_state_dict_pre_hook(_shard_state_hook)
    if tg.sequence_parallel:
        # The last module on sequence shards hands whole rows to the head (and the loss).
        last = model.norm if model.norm is not None else list(model.layers.values())[-1]
        last.register_forward_hook(_leave_sequence_hook(tg))
    # Dropout on the rank's heads (and sequence shards) draws per tensor rank, on replicated
    # activations the same on every tensor rank (parallel/dropout_rng.py).
    use_tensor_dropout_streams(list(model.layers.values()), tg.rank, tg.sequence_parallel)
    model.tensor_parallel_cut = True


def _finish(model: InternLM, tg: TensorGroup) -> None:
    """Hooks on the (materialised) parameters: with sequence parallelism the replicated ones (norms,
    out_proj's bias) hold partial gradients, summed over the tensor group; without it they get the
    same gradient on every rank already."""
    if tg.sequence_parallel:
        for p in replicated_parameters(model):
            p.register_hook(lambda grad: _all_reduce(grad, tg))
    return model


def _full_state_hook(tg: TensorGroup):
    """state_dict holds the full tensors under the full model's names (checkpoints, exports):
    a collective, so every rank of the tensor group takes the state dict together (the
    checkpoint writers do: they are chosen by data-parallel and pipeline rank)."""

    def hook(module, state_dict, prefix, local_metadata):
        for name, param in module.named_parameters(recurse=False):
            if getattr(param, "tensor_sharded", False) and prefix + name in state_dict:
                state_dict[prefix + name] = gather_full(param, tg)

    return hook


def _shard_state_hook(module, state_dict, prefix, *args):
    """load_state_dict takes full tensors and keeps this rank's shard of each."""
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        if getattr(param, "tensor_sharded", False) and key in state_dict:
            if tuple(state_dict[key].shape) == param.full_shape:
                state_dict[key] = shard_of_full(param, state_dict[key])


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if not getattr(p, "tensor_sharded", False)]


def tensor_norm_reducer(params: list[nn.Parameter], partition: tuple[int, int], tg: TensorGroup, inner):
    """Wraps the optimizer's squared-norm reducer: the sharded parameters' squares summed over the
    tensor group, the replicated ones (the same on every tensor rank) counted once. `params` is the
    optimizer's flat order, `partition` this rank's [start, end) of it."""
    start, end = partition

    def reduce(squared: torch.Tensor) -> torch.Tensor:
        replicated = torch.zeros_like(squared)
        offset = 0
        for p in params:
            n = p.numel()
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi and p.grad is not None and not getattr(p, "tensor_sharded", False):
                piece = p.grad.reshape(-1)[lo - offset : hi - offset]
                replicated += torch.linalg.vector_norm(piece.float()).double().pow(2)
            offset += n
        sharded = squared - replicated
        dist.all_reduce(sharded, group=tg.group)
        return inner(sharded + replicated)

    return reduce


def shard_model_part(model: nn.Module, config: ModelConfig, parallel) -> nn.Module:
    """This rank's tensor shard of the built model part (a model, a stage, or StageChunks);
    the part itself without tensor parallelism. `parallel` is the ParallelContext."""
    if parallel.tensor_group is None:
        return model
    tg = _group(parallel)
    for part in getattr(model, "chunks", [model]):
        if not getattr(part, "tensor_parallel_cut", False):  # built whole: cut now
            cut_for_tensor_parallel(part, config, tg)
        _finish(part, tg)
    return model


def tensor_cutter(config: ModelConfig, parallel) -> Callable[[InternLM], None] | None:
    """What the model builders apply on the meta device, before materialising (None without
    tensor parallelism); shard_model_part completes the shard afterwards."""
    if parallel.tensor_group is None:
        return None
    tg = _group(parallel)
    return lambda part: cut_for_tensor_parallel(part, config, tg)


def _group(parallel) -> TensorGroup:
    return TensorGroup(parallel.tensor_group, parallel.tp_rank, parallel.tp_size, parallel.sequence_parallel)


def use_global_grad_norm(optimizer, parallel) -> None:
    """Makes the ZeRO optimizer's grad norm (clipping, overflow skip) the whole model's with
    tensor parallelism: sharded parameters summed over the tensor group, replicated ones once."""
    if parallel.tensor_group is None:
        return
    tg = _group(parallel)
    inner = optimizer.inner
    inner.reduce_norm = tensor_norm_reducer(optimizer.params, (inner.start, inner.end), tg, inner.reduce_norm)
