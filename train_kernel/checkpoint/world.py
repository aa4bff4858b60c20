"""The few whole-job collectives checkpointing needs; each is a no-op in one process."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def gather_to_all(value: Any) -> list[Any]:
    if not _active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_from_zero(value: Any) -> Any:
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not _active():
        return flag
    gathered = gather_to_all(bool(flag))
    return any(gathered)


def host_name() -> str:
    """The node this rank runs on: Slurm's node name when under Slurm, else the host name. Ranks on
    another node than rank 0 cannot write into its spool (async saves: saver.py)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
