"""What one rank writes into a checkpoint folder. Every file is serialised in memory, hashed from
those bytes (no read-back) and written atomically with fsync, so the manifest entry and the file
always agree and a crash leaves no half-written file under a final name."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from . import layout
from .manifest import FileEntry, atomic_write_bytes
from .model_state import model_state
from .rng import capture_rng


@dataclass
class RunState:
    """The pieces of a training run that a checkpoint holds (the trainer's objects, duck-typed)."""

    config: Any  # TrainConfig
    model: torch.nn.Module
    optimizer: Any  # ZeroOptimizer
    sampler: Any  # BatchSampler
    counters: Any  # TrainState: batch_count, step_count, inf_nan_skip_batches, num_consumed_tokens
    parallel: Any  # ParallelContext


def layout_of(parallel: Any, config: Any) -> dict:
    return {
        "data": parallel.dp_size,
        "pipeline": parallel.pp_size,
        "zero": parallel.zero_size,
        "tensor": 1,
        "num_chunks": config.model.num_chunks,
    }


def _write(folder: Path, name: str, data: bytes) -> FileEntry:
    atomic_write_bytes(folder / name, data)
    return FileEntry(name, len(data), hashlib.sha256(data).hexdigest())


def _torch_bytes(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, indent=1, sort_keys=True).encode()


def write_rank_files(folder: Path, run: RunState) -> list[FileEntry]:
    """Writes this rank's share of the checkpoint into `folder`: the model file from the first
    data-parallel rank of each stage, the optimizer slice from each rank of the stage's first ZeRO
    group, its RNG state, and (rank 0) the run-wide files."""
    folder.mkdir(parents=True, exist_ok=True)
    parallel, config = run.parallel, run.config
    pp, dp = parallel.pp_rank, parallel.dp_rank
    entries: list[FileEntry] = []
    if dp == 0:
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in model_state(run.model).items()}
        entries.append(_write(folder, layout.model_file(pp), safetensors_bytes(tensors, metadata={"format": "pt"})))
        if pp == 0:
            model_json = json.dumps(config.model.to_json(), indent=2, sort_keys=True).encode()
            entries.append(_write(folder, layout.MODEL_CONFIG, model_json))
    if dp < parallel.zero_size:  # the first ZeRO group of the stage; the others hold copies
        entries.append(_write(folder, layout.optimizer_file(pp, parallel.zero_rank), _torch_bytes(run.optimizer.export_state())))
    entries.append(_write(folder, layout.rng_file(pp, dp), _torch_bytes(capture_rng())))
    if parallel.rank == 0:
        counters = run.counters
        entries.append(_write(folder, layout.SAMPLER, _json_bytes(run.sampler.state_dict())))
        entries.append(_write(folder, layout.SCHEDULER, _json_bytes({"step_count": counters.step_count})))
        context = {
            "batch_count": counters.batch_count,
            "step_count": counters.step_count,
            "inf_nan_skip_batches": counters.inf_nan_skip_batches,
            "num_consumed_tokens": counters.num_consumed_tokens,
            "layout": layout_of(parallel, config),
            "job_name": config.job_name,
            "saved_at": time.time(),
        }
        entries.append(_write(folder, layout.CONTEXT, _json_bytes(context)))
        entries.append(_write(folder, layout.CONFIG, config.source_text.encode()))
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
