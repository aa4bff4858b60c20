"""DTensor's parallelize_module against the project's hand-written tensor parallelism, measured on
the project's own decoder layers (torch.distributed.tensor, 2 gloo processes on this CPU).

Issue 16 asks for DTensor wherever it expresses the semantics on gloo and NCCL, hand-written
collectives only where measured necessary. This benchmark records, as facts:
  1. which collectives and DTensor styles run on gloo at all (reduce_scatter_tensor,
     ColwiseParallel / RowwiseParallel, SequenceParallel on the project's RMSNorm, loss_parallel);
  2. whether forward + backward (loss, every parameter gradient, the input gradient) of the layer
     stack equals one process's, for the project's version and the DTensor one;
  3. whether the project's semantics are expressible: the fused Wqkv cut by head groups as one
     Shard placement, the fused gate/up GEMM of the MLP, the varlen attention on local heads, the
     vocabulary-parallel loss (loss_parallel, with the bytes each keeps for backward);
  4. what ZeRO-1 (optim/zero.py: a flat fp32 master written back through views) and the
     overlapped gradient reducer (parallel/grad_overlap.py) do with DTensor parameters;
  5. the step time (forward + backward of the layer stack) of both, interleaved, median of REPEATS
     (and each round's own ratio), and DTensor's fixed cost per layer at a tiny shape.
The layer stack is SHAPE (bench_tensor_parallel.py's: hidden 512, 4 layers, 8 heads, seq 1024, fp32)
without embedding and head; the loss is a fixed random projection of the final norm's output.
Results: bench/results/dtensor_tp_<date>.json.
Run: python -m bench.bench_dtensor_tp (about 2 minutes on 2 cores; other load skews the times).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from bench.common import ROOT, result_line, run_ranks

SHAPE = dict(hidden=512, layers=4, heads=8, kv_heads=8, seq_len=1024, vocab=16000)
if os.environ.get("BENCH_DTENSOR_SMALL"):  # a quick trial of the script itself
    SHAPE = dict(hidden=128, layers=2, heads=4, kv_heads=4, seq_len=64, vocab=512)
GQA_SHAPE = dict(hidden=256, layers=1, heads=8, kv_heads=2, seq_len=128, vocab=512)  # Wqkv with GQA
REPEATS = int(os.environ.get("BENCH_DTENSOR_REPEATS", "11"))
OVERHEAD_SHAPE = dict(hidden=64, layers=4, heads=4, kv_heads=4, seq_len=64, vocab=512)
OVERHEAD_REPEATS = 30
RTOL, ATOL = 1e-4, 1e-5  # fp32; different summation orders (all-reduced partial sums)


# --- worker (one of 2 gloo ranks) -------------------------------------------------------------


def _error(exc: BaseException) -> str:
    """The error's first line, and where in the project it was raised (the innermost frame there)."""
    lines = str(exc).strip().splitlines()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/train_kernel/" in f.filename]
    where = f" (at {Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:400]}{where}"


def _fact(facts: dict, name: str, check: Callable[[], dict]) -> None:
    """Runs one check; its result or its error (both ranks run the same code path, so a failing
    DTensor op fails on both before any collective) goes into facts[name]."""
    import torch.distributed as dist

    try:
        facts[name] = {"runs": True, **check()}
    except Exception as exc:  # noqa: BLE001 - the error is the fact being recorded
        facts[name] = {"runs": False, "error": _error(exc)}
        if os.environ.get("BENCH_DTENSOR_TRACE"):
            traceback.print_exc()
    dist.barrier()


def _config(shape: dict):
    from train_kernel.model import ModelConfig

    return ModelConfig(
        num_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        num_kv_attention_heads=shape["kv_heads"],
        mlp_ratio=8 / 3,
        vocab_size=shape["vocab"],
        dtype="torch.float32",
        embed_grad_scale=1,
    )


def _stack(config):
    """The decoder layers and the final norm of the project's model (no embedding, no head)."""
    from train_kernel.model import build_model

    model = build_model(config, seed=1)
    model.embedding = None
    model.head = None
    return model


def _inputs(config, seq_len: int):
    """Hidden states, packed segments (3 documents), and the loss's fixed projection."""
    import torch

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, seq_len, config.hidden_size, generator=generator)
    cuts = [0, seq_len // 3, seq_len // 2, seq_len]
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:])]).unsqueeze(0)
    cu_seqlens = torch.tensor(cuts, dtype=torch.int32)
    projection = torch.randn(1, seq_len, config.hidden_size, generator=generator)
    return x, positions, cu_seqlens, projection


def _unfused_mlp(mlp) -> None:
    """The SwiGLU without the fused gate/up GEMM (which reads w1.weight and w2.weight directly,
    so parallelize_module's module hooks on w1 / w2 never run)."""
    import torch.nn.functional as F

    mlp.forward = types.MethodType(lambda self, x: self.w3(F.silu(self.w1(x)) * self.w2(x)), mlp)


def _grouped_qkv_order(config, size: int) -> list[int]:
    """Row order of the fused Wqkv that makes Shard(0) hand rank r exactly its head group:
    [q_0; k_0; v_0; q_1; k_1; v_1; ...] (the project's qkv_rows of every rank, concatenated)."""
    from train_kernel.parallel.tensor_parallel import TensorGroup, qkv_rows

    order: list[int] = []
    for rank in range(size):
        for lo, hi in qkv_rows(config, TensorGroup(None, rank, size)):
            order.extend(range(lo, hi))
    return order


def _regroup_qkv(model, config, size: int) -> list[int]:
    import torch

    order = _grouped_qkv_order(config, size)
    index = torch.tensor(order)
    with torch.no_grad():
        for layer in model.layers.values():
            wqkv = layer.attention.Wqkv
            wqkv.weight.copy_(wqkv.weight[index])
            wqkv.bias.copy_(wqkv.bias[index])
    return order


def _dtensor_plan(sequence_parallel: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    if not sequence_parallel:
        return {
            "attention.Wqkv": ColwiseParallel(),
            "attention.out_proj": RowwiseParallel(),
            # The MLP's input as one replicated DTensor: w1's and w2's input gradients (partial
            # sums) add up before the one all-reduce (without it: an all-reduce for each).
            "mlp": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            "mlp.w1": ColwiseParallel(),
            "mlp.w2": ColwiseParallel(),
            "mlp.w3": RowwiseParallel(),
        }
    # torchtitan's pattern: norms on sequence shards, one all-gather into each parallel region
    # (PrepareModuleInput), a reduce-scatter out of it (RowwiseParallel's output Shard(1)).
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attention.Wqkv": ColwiseParallel(),
        "attention.out_proj": RowwiseParallel(output_layouts=Shard(1)),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.w1": ColwiseParallel(),
        "mlp.w2": ColwiseParallel(),
        "mlp.w3": RowwiseParallel(output_layouts=Shard(1)),
    }


def _dtensor_stack(config, mesh, sequence_parallel: bool, unfused_mlp: bool = True):
    """The project's layer stack parallelised with parallelize_module; the Wqkv rows regrouped
    first (no single Shard placement cuts [q; k; v] by head groups)."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    model = _stack(config)
    size = mesh.size()
    _regroup_qkv(model, config, size)
    for layer in model.layers.values():
        layer.attention.num_heads //= size
        layer.attention.kv_heads //= size
        if unfused_mlp:
            _unfused_mlp(layer.mlp)
        parallelize_module(layer, mesh, _dtensor_plan(sequence_parallel))
    if sequence_parallel and model.norm is not None:
        parallelize_module(model.norm, mesh, SequenceParallel())
    return model


def _project_stack(config, group, rank: int, size: int, sequence_parallel: bool, unfused_mlp: bool = False):
    from train_kernel.parallel.tensor_parallel import TensorGroup, apply_tensor_parallel

    model = _stack(config)
    apply_tensor_parallel(model, config, TensorGroup(group, rank, size, sequence_parallel))
    if unfused_mlp:
        for layer in model.layers.values():
            _unfused_mlp(layer.mlp)
    return model


def _local_input(x, rank: int, size: int, sequence_parallel: bool):
    return x.chunk(size, dim=1)[rank].contiguous() if sequence_parallel else x


def _counted(run: Callable[[], object]) -> tuple[object, dict]:
    """`run`'s result and the collectives it issued: calls and bytes of the whole tensor (an
    all-gather's output, a reduce-scatter's input, an all-reduce's tensor) per op. A dispatch mode
    sees DTensor's functional collectives and plain torch.distributed calls alike; DTensor ops are
    handed back (NotImplemented, as CommDebugMode does) so the redistributions inside them are seen
    too. (CommDebugMode itself fails here: its module tracker's IndexError in a post-forward hook.)"""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts: dict[str, list[int]] = {}  # op: [calls, bytes]
    skip = ("wait_tensor", "_wrap_tensor_autograd")

    def nbytes(tree) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.namespace in ("c10d", "_c10d_functional") and name not in skip:
                if name == "allgather_":  # ([[outputs]], [input], ...): the gathered parts
                    size = nbytes(args[0])
                elif name in ("all_gather_into_tensor", "_allgather_base_"):
                    size = nbytes(out if name == "all_gather_into_tensor" else args[0])
                else:  # all-reduce, reduce-scatter (input first), broadcast
                    size = nbytes(args[0])
                entry = counts.setdefault(name.strip("_"), [0, 0])
                entry[0] += 1
                entry[1] += size
            return out

    with Count():
        out = run()
    return out, {name: {"calls": c, "bytes": b} for name, (c, b) in sorted(counts.items())}


def _forward_backward(model, x, positions, cu_seqlens, projection):
    """Loss and backward of the stack; returns (loss, output as a plain full tensor, x's grad)."""
    from torch.distributed.tensor import DTensor

    x = x.detach().requires_grad_(True)
    out = model(x, positions, cu_seqlens)
    if isinstance(out, DTensor):
        out = out.full_tensor()
    loss = (out * projection).mean()
    loss.backward()
    return loss.detach(), out.detach(), x.grad


def _full_grads(model, qkv_order: list[int] | None, group) -> dict:
    """Every parameter's whole gradient: DTensor grads via full_tensor (the regrouped Wqkv rows put
    back), the project's shards via gather_full (replicated parameters as they are)."""
    import torch
    from torch.distributed.tensor import DTensor

    from train_kernel.parallel.tensor_parallel import TensorGroup, gather_full

    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        elif getattr(p, "tensor_sharded", False):
            grad.full_shape, grad.tensor_pieces = p.full_shape, p.tensor_pieces
            grad = gather_full(grad, TensorGroup(group, dist_rank(), dist_world()))
        if qkv_order is not None and name.endswith(("Wqkv.weight", "Wqkv.bias")):
            back = torch.empty_like(grad)
            back[torch.tensor(qkv_order)] = grad
            grad = back
        grads[name] = grad
    return grads


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _compare(reference: tuple, result: tuple, ref_grads: dict, grads: dict) -> dict:
    import torch

    loss_ref, out_ref, xgrad_ref = reference
    loss, out, xgrad = result
    worst = 0.0
    for name, g in ref_grads.items():
        worst = max(worst, float((grads[name] - g).abs().max() / (g.abs().max() + 1e-30)))
    return {
        "loss_equal": bool(torch.allclose(loss, loss_ref, rtol=RTOL, atol=ATOL)),
        "output_equal": bool(torch.allclose(out, out_ref, rtol=RTOL, atol=ATOL)),
        "input_grad_equal": bool(torch.allclose(xgrad, xgrad_ref, rtol=RTOL, atol=ATOL)),
        "param_grads_equal": all(
            torch.allclose(grads[n], g, rtol=RTOL, atol=ATOL) for n, g in ref_grads.items()
        ),
        "worst_param_grad_rel_diff": worst,
    }


def _check_collectives(facts: dict) -> None:
    import torch
    import torch.distributed as dist

    def reduce_scatter_tensor() -> dict:
        x = torch.arange(8, dtype=torch.float32) + 10 * dist_rank()
        out = torch.empty(4)
        dist.reduce_scatter_tensor(out, x)
        expected = (torch.arange(8, dtype=torch.float32) * 2 + 10).chunk(2)[dist_rank()]
        return {"correct": bool(torch.equal(out, expected)), "backend": dist.get_backend()}

    _fact(facts, "gloo_reduce_scatter_tensor", reduce_scatter_tensor)

    def reduce_scatter_speed() -> dict:
        # Sequence parallel's reduce-scatter at this shape: [1, seq, hidden] fp32, along the tokens.
        x = torch.randn(SHAPE["seq_len"], SHAPE["hidden"])
        out = torch.empty(SHAPE["seq_len"] // 2, SHAPE["hidden"])
        times = {"reduce_scatter_tensor": [], "all_reduce_and_slice": []}
        for _ in range(20):
            for name in times:
                dist.barrier()
                started = time.perf_counter()
                if name == "reduce_scatter_tensor":
                    dist.reduce_scatter_tensor(out, x)
                else:
                    y = x.clone()
                    dist.all_reduce(y)
                    out.copy_(y.chunk(2)[dist_rank()])
                times[name].append(time.perf_counter() - started)
        medians = {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
        return {"tensor_bytes": x.numel() * 4, **medians}

    _fact(facts, "gloo_reduce_scatter_vs_all_reduce_slice", reduce_scatter_speed)


def _check_stack(facts: dict, mesh, group, reference: dict) -> None:
    """Facts 1-3 on the layer stack: runs at all, equals one process."""
    import torch.distributed as dist

    config = _config(SHAPE)
    x, positions, cu_seqlens, projection = reference["inputs"]
    rank, size = dist_rank(), dist_world()
    for sp in (False, True):
        tag = "sequence_parallel" if sp else "plain"
        local = _local_input(x, rank, size, sp)

        def project(sp=sp, local=local) -> dict:
            model = _project_stack(config, group, rank, size, sp)
            result, comms = _counted(
                lambda: _forward_backward(model, local, positions, cu_seqlens, projection)
            )
            result = (result[0], result[1], _gather_seq(result[2], sp, group))
            out = _compare(reference["result"], result, reference["grads"], _full_grads(model, None, group))
            return {**out, "collectives_per_forward_backward": comms}

        _fact(facts, f"project_{tag}_equals_one_process", project)

        def dtensor_fused_mlp(sp=sp, local=local) -> dict:
            model = _dtensor_stack(config, mesh, sp, unfused_mlp=False)
            result, comms = _counted(
                lambda: _forward_backward(model, local, positions, cu_seqlens, projection)
            )
            result = (result[0], result[1], _gather_seq(result[2], sp, group))
            order = _grouped_qkv_order(config, size)
            out = _compare(reference["result"], result, reference["grads"], _full_grads(model, order, group))
            return {**out, "collectives_per_forward_backward": comms}

        _fact(facts, f"dtensor_{tag}_with_fused_gate_up_gemm", dtensor_fused_mlp)

        def dtensor(sp=sp, local=local) -> dict:
            model = _dtensor_stack(config, mesh, sp)
            result, comms = _counted(
                lambda: _forward_backward(model, local, positions, cu_seqlens, projection)
            )
            result = (result[0], result[1], _gather_seq(result[2], sp, group))
            order = _grouped_qkv_order(config, size)
            out = _compare(reference["result"], result, reference["grads"], _full_grads(model, order, group))
            out["collectives_per_forward_backward"] = comms
            norm = model.layers["0"].attention_norm.weight
            out["norm_weight_grad_placements"] = str(getattr(norm.grad, "placements", "plain tensor"))
            return out

        _fact(facts, f"dtensor_{tag}_unfused_mlp_equals_one_process", dtensor)
    dist.barrier()


def _gather_seq(grad, sequence_parallel: bool, group):
    import torch
    import torch.distributed as dist

    if not sequence_parallel:
        return grad
    parts = [torch.empty_like(grad) for _ in range(dist_world())]
    dist.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _check_qkv_placement(facts: dict, mesh) -> None:
    """Fact 3a: is the head-group cut of the fused Wqkv one Shard placement (GQA: kv heads split)?"""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from train_kernel.parallel.tensor_parallel import TensorGroup, qkv_rows

    def check() -> dict:
        config = _config(GQA_SHAPE)
        rows = config.qkv_size
        full = torch.arange(rows, dtype=torch.float32).unsqueeze(1).expand(rows, 4).contiguous()
        wanted = torch.cat([full[lo:hi] for lo, hi in qkv_rows(config, TensorGroup(None, dist_rank(), 2))])
        plain = distribute_tensor(full, mesh, [Shard(0)]).to_local()
        order = _grouped_qkv_order(config, 2)
        regrouped = distribute_tensor(full[torch.tensor(order)], mesh, [Shard(0)]).to_local()
        return {
            "heads_kv_heads_head_dim": [config.num_attention_heads, config.kv_heads, config.head_dim],
            "shard0_equals_head_group_cut": bool(torch.equal(plain, wanted)),
            "shard0_after_row_regroup_equals_head_group_cut": bool(torch.equal(regrouped, wanted)),
            "regroup_is_identity": order == list(range(rows)),
        }

    _fact(facts, "fused_wqkv_head_group_cut", check)


def _saved_bytes(run: Callable[[], object]) -> tuple[object, int]:
    """Bytes of the tensors autograd keeps for backward while `run` executes (DTensors: local)."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def pack(t):
        local = t.to_local() if isinstance(t, DTensor) else t
        seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


def _check_loss(facts: dict, mesh, group) -> None:
    """Fact 3c: the vocabulary-parallel loss with loss_parallel against the project's fused one."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    from train_kernel.parallel.tensor_parallel import TensorGroup, VocabParallelHead
    from train_kernel.train.fused_loss import head_cross_entropy

    tokens, hidden, vocab = SHAPE["seq_len"], SHAPE["hidden"], SHAPE["vocab"]
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(tokens, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.02
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    h_ref = h.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    loss_ref = F.cross_entropy(h_ref @ w_ref.t(), labels)
    loss_ref.backward()
    rank, size = dist_rank(), dist_world()
    rows = slice(rank * vocab // size, (rank + 1) * vocab // size)

    def dtensor() -> dict:
        head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
        x = h.clone().requires_grad_(True)
        with loss_parallel():
            loss, saved = _saved_bytes(lambda: F.cross_entropy(head(x), labels))
            loss.backward()
        w_grad = head.weight.grad.full_tensor()
        return {
            "loss_equal": bool(torch.allclose(loss.full_tensor(), loss_ref, rtol=RTOL, atol=ATOL)),
            "hidden_grad_equal": bool(torch.allclose(x.grad, h_ref.grad, rtol=RTOL, atol=ATOL)),
            "weight_grad_equal": bool(torch.allclose(w_grad, w_ref.grad, rtol=RTOL, atol=ATOL)),
            "bytes_saved_for_backward": saved,
        }

    _fact(facts, "dtensor_loss_parallel", dtensor)

    def project() -> dict:
        tg = TensorGroup(group, rank, size)
        full = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            full.weight.copy_(weight)
        head = VocabParallelHead(full, rows, tg, parallel_output=True)
        x = h.clone().requires_grad_(True)
        out, saved = _saved_bytes(lambda: head_cross_entropy(x, head.weight, labels))
        out.loss.backward()
        return {
            "loss_equal": bool(torch.allclose(out.loss, loss_ref, rtol=RTOL, atol=ATOL)),
            "hidden_grad_equal": bool(torch.allclose(x.grad, h_ref.grad, rtol=RTOL, atol=ATOL)),
            "weight_grad_equal": bool(
                torch.allclose(head.weight.grad, w_ref.grad[rows], rtol=RTOL, atol=ATOL)
            ),
            "bytes_saved_for_backward": saved,
        }

    _fact(facts, "project_fused_vocab_parallel_loss", project)
    facts["logits_bytes_full_vocab"] = tokens * vocab * 4
    facts["logits_bytes_vocab_slice"] = tokens * vocab // size * 4


def _check_optimizer(facts: dict, mesh) -> None:
    """Fact 4: ZeRO-1 and the overlapped gradient reducer handed DTensor parameters (small case)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from train_kernel.optim.hybrid_adamw import AdamSettings
    from train_kernel.optim.loss_scaler import DynamicLossScaler
    from train_kernel.optim.zero import ZeroOptimizer
    from train_kernel.parallel.grad_overlap import OverlappedGradReducer

    config = _config(GQA_SHAPE)
    x, positions, cu_seqlens, projection = _inputs(config, GQA_SHAPE["seq_len"])
    own = [dist.new_group([r]) for r in range(dist_world())][dist_rank()]  # a data group of one

    def model_with_grads():
        model = _dtensor_stack(config, mesh, sequence_parallel=False)
        _forward_backward(model, x, positions, cu_seqlens, projection)
        return model

    def zero() -> dict:
        model = model_with_grads()
        params = list(model.parameters())
        optimizer = ZeroOptimizer(params, AdamSettings(lr=1e-3), DynamicLossScaler(enabled=False), 1.0)
        before = [p.detach().clone() for p in params]
        result = optimizer.step(lr=1e-3, beta2=0.95)
        changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        return {"updated": bool(result.updated), "params_changed": f"{changed} of {len(params)}"}

    _fact(facts, "zero1_optimizer_with_dtensor_params", zero)

    def zero_all_dtensor() -> dict:
        # Every parameter a DTensor (the plain ones, norms and biases, replicated): no mixing.
        from torch.distributed.tensor import Replicate

        model = _dtensor_stack(config, mesh, sequence_parallel=False)
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if not isinstance(p, DTensor):
                    setattr(
                        module, name, torch.nn.Parameter(DTensor.from_local(p.detach(), mesh, [Replicate()]))
                    )
        params = list(model.parameters())
        for p in params:  # (the model's forward no longer runs: RMSNorm mixes x and a DTensor weight)
            p.grad = torch.ones_like(p)
        optimizer = ZeroOptimizer(params, AdamSettings(lr=1e-3), DynamicLossScaler(enabled=False), 1.0)
        master = optimizer.inner.master
        local = sum(p.to_local().numel() for p in params)
        before = [p.to_local().clone() for p in params]
        updated = bool(optimizer.step(lr=1e-3, beta2=0.95).updated)
        changed = sum(not torch.equal(b, p.to_local()) for b, p in zip(before, params))
        return {
            "master_is_dtensor": isinstance(master, DTensor),
            "master_placements": str(getattr(master, "placements", None)),
            "master_elements_global": master.numel(),
            "master_elements_on_this_rank": master.to_local().numel()
            if isinstance(master, DTensor)
            else None,
            "local_shard_elements": local,
            "step_updated": updated,
            "params_changed": f"{changed} of {len(params)}",
        }

    _fact(facts, "zero1_optimizer_with_every_param_dtensor", zero_all_dtensor)

    def reducer() -> dict:
        model = _dtensor_stack(config, mesh, sequence_parallel=False)
        params = list(model.parameters())
        grad_reducer = OverlappedGradReducer(params, own, 1, 1 << 20)
        grad_reducer.arm()
        _forward_backward(model, x, positions, cu_seqlens, projection)
        grad_reducer.finish()
        return {"buckets": len(grad_reducer.buckets)}

    _fact(facts, "overlapped_grad_reducer_with_dtensor_params", reducer)

    def local_views() -> dict:
        # What a shim would rely on: writes through a view of the DTensor's local shard reach it.
        model = _dtensor_stack(config, mesh, sequence_parallel=False)
        p = model.layers["0"].mlp.w1.weight
        local = p.to_local()
        with torch.no_grad():
            local.view(-1)[:3].fill_(42.0)
        return {
            "is_dtensor": isinstance(p, DTensor),
            "write_through_to_local_view_reaches_parameter": bool((p.to_local().view(-1)[:3] == 42).all()),
            "to_local_shares_storage": local.data_ptr() == p.to_local().data_ptr(),
        }

    _fact(facts, "dtensor_local_shard_views", local_views)


def _time_stacks(facts: dict, mesh, group, reference: dict) -> None:
    """Fact 5: forward + backward of the stack, the versions interleaved, median of REPEATS."""
    import torch
    import torch.distributed as dist

    config = _config(SHAPE)
    x, positions, cu_seqlens, projection = reference["inputs"]
    rank, size = dist_rank(), dist_world()
    for sp in (False, True):
        tag = "sequence_parallel" if sp else "plain"
        local = _local_input(x, rank, size, sp)
        builders = {
            "project": lambda sp=sp: _project_stack(config, group, rank, size, sp),
            "project_unfused_mlp": lambda sp=sp: _project_stack(config, group, rank, size, sp, True),
            "dtensor": lambda sp=sp: _dtensor_stack(config, mesh, sp),
        }
        runners: dict[str, Callable[[], object]] = {}
        entry: dict = {}
        for name, build in builders.items():
            try:
                model = build()

                def run(model=model, local=local):
                    model.zero_grad(set_to_none=True)
                    return _forward_backward(model, local, positions, cu_seqlens, projection)

                loss = run()[0]  # warm-up
                entry[f"{name}_loss_equals_one_process"] = bool(
                    torch.allclose(loss, reference["result"][0], rtol=RTOL, atol=ATOL)
                )
                runners[name] = run
            except Exception as exc:  # noqa: BLE001 - recorded; the other versions still time
                entry[f"{name}_error"] = _error(exc)
            dist.barrier()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(REPEATS):
            for name, run in runners.items():
                dist.barrier()
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(t) for name, t in times.items()}
        entry.update({f"{name}_median_s": round(m, 4) for name, m in medians.items()})
        entry.update({f"{name}_min_s": round(min(t), 4) for name, t in times.items()})
        entry.update({f"{name}_all_s": [round(t, 4) for t in ts] for name, ts in times.items()})
        for name in medians:
            if name != "project" and "project" in medians:
                entry[f"{name}_over_project_median"] = round(medians[name] / medians["project"], 3)
                entry[f"{name}_over_project_min"] = round(min(times[name]) / min(times["project"]), 3)
                # Each round's own ratio (the versions ran back to back): robust to load that
                # drifts between rounds on a shared machine.
                paired = [a / b for a, b in zip(times[name], times["project"])]
                entry[f"{name}_over_project_paired_median"] = round(statistics.median(paired), 3)
        if "dtensor" in medians and "project_unfused_mlp" in medians:
            entry["dtensor_over_project_unfused_mlp_median"] = round(
                medians["dtensor"] / medians["project_unfused_mlp"], 3
            )
        facts[f"step_time_{tag}"] = entry


def _time_overhead(facts: dict, mesh, group) -> None:
    """DTensor's fixed cost per forward + backward (Python dispatch, sharding propagation): the
    layer stack at a shape too small for the arithmetic to matter, against the project's version
    with the same unfused MLP, interleaved, OVERHEAD_REPEATS rounds. On a GPU, where a layer's
    arithmetic takes milliseconds, this is the part that does not shrink."""
    import torch.distributed as dist

    config = _config(OVERHEAD_SHAPE)
    x, positions, cu_seqlens, projection = _inputs(config, OVERHEAD_SHAPE["seq_len"])
    rank, size = dist_rank(), dist_world()
    models = {
        "project_unfused_mlp": _project_stack(config, group, rank, size, False, True),
        "dtensor": _dtensor_stack(config, mesh, False),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(OVERHEAD_REPEATS + 2):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            dist.barrier()
            started = time.perf_counter()
            _forward_backward(model, x, positions, cu_seqlens, projection)
            if round_ >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - started)
    paired = [a - b for a, b in zip(times["dtensor"], times["project_unfused_mlp"])]
    facts["dtensor_fixed_overhead"] = {
        "shape": OVERHEAD_SHAPE,
        "project_unfused_mlp_median_ms": round(statistics.median(times["project_unfused_mlp"]) * 1e3, 2),
        "dtensor_median_ms": round(statistics.median(times["dtensor"]) * 1e3, 2),
        "extra_ms_per_forward_backward_paired_median": round(statistics.median(paired) * 1e3, 2),
        "extra_ms_per_layer": round(statistics.median(paired) * 1e3 / OVERHEAD_SHAPE["layers"], 2),
    }


def worker() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (dist_world(),))
    group = dist.group.WORLD
    facts: dict = {"torch": torch.__version__}
    _check_collectives(facts)
    # One process's result (every rank computes it alone, the same inputs and weights).
    config = _config(SHAPE)
    inputs = _inputs(config, SHAPE["seq_len"])
    single = _stack(config)
    result = _forward_backward(single, *inputs)
    reference = {
        "inputs": inputs,
        "result": result,
        "grads": {n: p.grad for n, p in single.named_parameters()},
    }
    _check_qkv_placement(facts, mesh)
    _check_stack(facts, mesh, group, reference)
    _check_loss(facts, mesh, group)
    _check_optimizer(facts, mesh)
    _time_overhead(facts, mesh, group)
    _time_stacks(facts, mesh, group, reference)
    if dist_rank() == 0:
        print("RESULT " + json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()


# --- launcher ---------------------------------------------------------------------------------


def _run(world: int = 2) -> dict:
    return result_line(run_ranks(["-m", "bench.bench_dtensor_tp", "--worker"], world, timeout_s=900))


def main() -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    facts = _run()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "shape": SHAPE,
        "dtype": "float32",
        "processes": "2 gloo ranks, 1 thread each",
        "repeats": REPEATS,
        "step": "forward + backward of the layer stack (layers + final norm), no optimizer step",
        "wall_s": round(time.perf_counter() - started, 1),
        **facts,
    }
    out = ROOT / "bench" / "results" / f"dtensor_tp_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
