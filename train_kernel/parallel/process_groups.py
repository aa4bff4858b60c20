"""torch.distributed setup and teardown for one training process: the default group from the
env:// variables the CLI's launcher set, then one DeviceMesh (`torch.distributed.device_mesh`) over
the job with named dimensions, from which the data-parallel, ZeRO-1, pipeline and tensor groups of
ParallelLayout are taken.

Mesh dimensions, outermost first, in InternLM's rank order (tensor ranks adjacent, then data, then
pipeline): ("pipeline", "data_replicate", "zero", "tensor"). A ZeRO-1 group is a slice of `zero`
consecutive data-parallel ranks, so data parallel is "data_replicate" x "zero", flattened into the
dimension "data" (torchtitan builds its data-parallel mesh the same way).

Every check that can fail on a user's config runs before the first collective, so a misconfigured
job stops on every rank with the same message instead of hanging in a rendezvous.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train_kernel.parallel.collectives import sum_over
from train_kernel.parallel.layout import LayoutError, ParallelLayout

if TYPE_CHECKING:
    from train_kernel.config.sections import ParallelConfig

log = logging.getLogger(__name__)

# Seconds a collective may wait for its peers before the job fails (the watchdog): a rank that died
# without closing its connections shows up as a timeout on the others instead of a hang.
DEFAULT_TIMEOUT_S = 600.0
MESH_DIMS = ("pipeline", "data_replicate", "zero", "tensor")
TIMEOUT_ENV = "TRAIN_KERNEL_DIST_TIMEOUT_S"


def layout_for(parallel: ParallelConfig, world_size: int) -> ParallelLayout:
    """The layout of this job; raises LayoutError (a ConfigError) when it cannot run.

    A single process has no ZeRO group to split over: a zero1 > 1 (the seed's zero1=8) is ignored
    there with a warning, so that a config written for a cluster still runs locally."""
    zero1 = parallel.zero1
    if world_size == 1 and zero1 > 1:
        log.warning("one process: parallel.zero1=%d ignored (no ZeRO-1 group to split over)", zero1)
        zero1 = 1
    return ParallelLayout(
        world_size=world_size, tensor=parallel.tensor.size, pipeline=parallel.pipeline.size, zero1=zero1
    )


@dataclass
class ParallelContext:
    """This rank's place in the job and the groups it communicates over (None in one process)."""

    layout: ParallelLayout
    rank: int = 0
    data_group: dist.ProcessGroup | None = None
    zero_group: dist.ProcessGroup | None = None
    zero_ranks: list[int] = field(default_factory=lambda: [0])
    pipeline_group: dist.ProcessGroup | None = None  # None without pipeline parallelism
    pipeline_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks, stage 0 first
    mesh: DeviceMesh | None = None  # the job's mesh (None in one process); groups for later dims
    tensor_group: dist.ProcessGroup | None = None  # None without tensor parallelism
    sequence_parallel: bool = False  # parallel.sequence_parallel (with tensor parallelism only)

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank).data

    @property
    def dp_size(self) -> int:
        return self.layout.data

    @property
    def zero_rank(self) -> int:
        return self.layout.coords(self.rank).zero

    @property
    def zero_size(self) -> int:
        return self.layout.zero

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank).tensor

    @property
    def tp_size(self) -> int:
        return self.layout.tensor

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank).pipeline

    @property
    def pp_size(self) -> int:
        return self.layout.pipeline

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (same data-parallel rank); None on stage 0."""
        return None if self.is_first_stage else self.pipeline_ranks[self.pp_rank - 1]

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the next pipeline stage; None on the last stage."""
        return None if self.is_last_stage else self.pipeline_ranks[self.pp_rank + 1]

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def sum_over_job(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`values` (a CPU tensor) summed over this rank's pipeline group, then its data-parallel
        group, on the CPU: what the last stage alone computed (loss, metrics) reaches every stage,
        and the data-parallel ranks' shares of a batch add up to the whole batch's. No-op in one
        process."""
        # NOTE: the pipeline sum first: the logging rank is on stage 0, the loss on the last stage.
        values = sum_over(values.to(device), self.pipeline_group)
        # NOTE: then one all-reduce over data parallel carries every number the log line reports.
        return sum_over(values.to(device), self.data_group).cpu()

    def close(self, barrier: bool) -> None:
        """Destroys the groups. `barrier`: after a clean run, first wait for every rank."""
        if not self.distributed or not dist.is_initialized():
            return
        if barrier:
            # NOTE: rank 0 hosts the rendezvous store; the barrier keeps it alive until every rank
            # has finished its last collective, so a clean run never ends in a peer's connection error.
            dist.barrier()
        dist.destroy_process_group()


def _timeout(environ: Mapping[str, str]) -> timedelta:
    raw = environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise LayoutError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return timedelta(seconds=seconds)


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LayoutError(f"${name}={raw!r} is not an integer") from None


def init_parallel(parallel: ParallelConfig, environ: Mapping[str, str] | None = None) -> ParallelContext:
    """Validates the layout, then (WORLD_SIZE > 1) initialises the default group with env:// and
    creates the data-parallel, ZeRO-1 and pipeline groups of this rank."""
    environ = os.environ if environ is None else environ
    world_size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    if not 0 <= rank < max(world_size, 1):
        raise LayoutError(f"RANK {rank} is outside [0, WORLD_SIZE={world_size})")
    layout = layout_for(parallel, world_size)  # every user error is raised here, before any collective
    if world_size == 1:
        return ParallelContext(layout=layout)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int(environ, "LOCAL_RANK", 0))
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=_timeout(environ)
    )
    # NOTE: collective over the whole world: every rank builds the same mesh, and with it every
    # group of every dimension, and keeps the ones it belongs to.
    mesh = init_device_mesh(
        "cuda" if backend == "nccl" else "cpu",
        (layout.pipeline, layout.num_zero_groups, layout.zero, layout.tensor),
        mesh_dim_names=MESH_DIMS,
    )
    data_mesh = mesh["data_replicate", "zero"]._flatten("data")
    zero_ranks = mesh["zero"].mesh.flatten().tolist()
    pipeline_ranks = mesh["pipeline"].mesh.flatten().tolist()
    if zero_ranks != layout.zero_group(rank) or pipeline_ranks != layout.pipeline_group(rank):
        raise RuntimeError(f"the device mesh disagrees with the layout's rank order at rank {rank}")
    log.info("process group: rank %d of %d (%s), backend %s", rank, world_size, layout.describe(), backend)
    return ParallelContext(
        layout=layout,
        rank=rank,
        data_group=data_mesh.get_group(),
        zero_group=mesh["zero"].get_group(),
        zero_ranks=zero_ranks,
        # The pipeline group carries the sums of the per-step statistics (only the last stage has
        # the loss) and of the gradient norm.
        pipeline_group=mesh["pipeline"].get_group() if layout.pipeline > 1 else None,
        pipeline_ranks=pipeline_ranks,
        mesh=mesh,
        tensor_group=mesh["tensor"].get_group() if layout.tensor > 1 else None,
        sequence_parallel=parallel.sequence_parallel and layout.tensor > 1,
    )
