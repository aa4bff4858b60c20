"""What one rank writes into a checkpoint folder. Every file is serialised straight into a
temporary file (one pass over the bytes: the trainer's stall), fsynced and renamed, so a crash
leaves no half-written file under a final name. Checksums are taken here (synchronous saves) or
later by a background thread (async saves: see saver.py), off the training path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from train_kernel.durable import atomic_write
from train_kernel.model.config import model_config_json

from . import layout
from .manifest import FileEntry, sha256_of
from .model_state import model_state
from .param_index import index_bytes, stage_index
from .rng import capture_rng

if TYPE_CHECKING:  # the trainer's objects; importing them here would make checkpoint/ depend on train/
    from train_kernel.config import TrainConfig
    from train_kernel.data.sampler import BatchSampler
    from train_kernel.optim.zero import ZeroOptimizer
    from train_kernel.parallel.process_groups import ParallelContext
    from train_kernel.train.train_state import TrainState


@dataclass
class RunState:
    """The pieces of a training run that a checkpoint holds (the trainer's objects, duck-typed)."""

    config: TrainConfig
    model: torch.nn.Module
    optimizer: ZeroOptimizer
    sampler: BatchSampler
    counters: TrainState  # batch_count, step_count, inf_nan_skip_batches, num_consumed_tokens
    parallel: ParallelContext


def layout_of(parallel: ParallelContext, config: TrainConfig) -> dict:
    return {
        "data": parallel.dp_size,
        "pipeline": parallel.pp_size,
        "zero": parallel.zero_size,
        "tensor": getattr(getattr(parallel, "layout", None), "tensor", 1),
        "num_chunks": config.model.num_chunks,
    }


def describe_layout(saved: dict) -> str:
    """`data=2 zero1=2 pipeline=1 num_chunks=1 tensor=1` (`?` where an old manifest has no entry)."""
    keys = (("data", "data"), ("zero1", "zero"), ("pipeline", "pipeline"), ("num_chunks", "num_chunks"))
    parts = [f"{label}={saved.get(key, '?')}" for label, key in keys]
    return " ".join([*parts, f"tensor={saved.get('tensor', 1)}"])


def _write(folder: Path, name: str, write: Callable[[Path], None], checksum: bool) -> FileEntry:
    path = folder / name
    atomic_write(path, write)
    return FileEntry(name, path.stat().st_size, sha256_of(path) if checksum else "")


def _torch_writer(payload: dict) -> Callable[[Path], None]:
    return lambda path: torch.save(payload, path)


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _json_writer(payload: dict) -> Callable[[Path], None]:
    return _bytes_writer(json.dumps(payload, indent=1, sort_keys=True).encode())


def write_rank_files(folder: Path, run: RunState, checksum: bool = True) -> list[FileEntry]:
    """Writes this rank's share of the checkpoint into `folder`: the model file and the optimizer
    index from the first data-parallel rank of each stage, the optimizer slice from each rank of
    the stage's first ZeRO group, its RNG state, and (rank 0) the run-wide files.
    `checksum=False` leaves the entries' sha256 empty, for a later pass."""
    folder.mkdir(parents=True, exist_ok=True)
    run.optimizer.wait_params()  # the weights of an overlapped ZeRO broadcast must have landed
    parallel, config = run.parallel, run.config
    pp, dp = parallel.pp_rank, parallel.dp_rank
    entries: list[FileEntry] = []

    def add(name: str, write: Callable[[Path], None]) -> None:
        entries.append(_write(folder, name, write, checksum))

    tp = getattr(parallel, "tp_rank", 0)
    if dp == 0:
        # NOTE: with tensor parallelism model_state gathers the whole weights (a collective of the
        # tensor group); tensor rank 0 writes them.
        tensors = {
            key: value.detach().to("cpu").contiguous() for key, value in model_state(run.model).items()
        }
        if tp == 0:
            add(layout.model_file(pp), lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
        if pp == 0 and tp == 0:
            add(
                layout.MODEL_CONFIG,
                _bytes_writer(json.dumps(model_config_json(config.model), indent=2, sort_keys=True).encode()),
            )
        optimizer = run.optimizer
        index = stage_index(run.model, optimizer.params, optimizer.ranges)
        add(layout.optimizer_index_file(pp, tp), _bytes_writer(index_bytes(index)))
    if dp < parallel.zero_size:  # the first ZeRO group of the stage; the others hold copies
        add(layout.optimizer_file(pp, parallel.zero_rank, tp), _torch_writer(run.optimizer.export_state()))
    add(layout.rng_file(pp, dp, tp), _torch_writer(capture_rng()))
    if parallel.rank == 0:
        counters = run.counters
        add(layout.SAMPLER, _json_writer(run.sampler.state_dict()))
        add(layout.SCHEDULER, _json_writer({"step_count": counters.step_count}))
        context = {
            "batch_count": counters.batch_count,
            "step_count": counters.step_count,
            "inf_nan_skip_batches": counters.inf_nan_skip_batches,
            "num_consumed_tokens": counters.num_consumed_tokens,
            "layout": layout_of(parallel, config),
            "job_name": config.job_name,
            "saved_at": time.time(),
        }
        add(layout.CONTEXT, _json_writer(context))
        add(layout.CONFIG, _bytes_writer(config.source_text.encode()))
    return entries


def estimate_rank_bytes(run: RunState) -> int:
    """About how many bytes write_rank_files will write on this rank (the spool's room check)."""
    parallel = run.parallel
    total = 64 * 1024  # json files, RNG state, headers
    if parallel.dp_rank == 0:
        total += sum(t.numel() * t.element_size() for t in model_state(run.model).values())
    if parallel.dp_rank < parallel.zero_size:
        start, end = run.optimizer.partition
        total += 3 * 4 * (end - start)  # fp32 master, exp_avg, exp_avg_sq
    return total
