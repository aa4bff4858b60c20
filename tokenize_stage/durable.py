"""Renames that survive a power loss: the data first, then the name.

A rename alone can reach the disk before the file's blocks: after a crash the shard is there under
its final name, with a hole or nothing inside, and the next run takes it as done. So the file is
fsynced before the rename, and its folder after it (the rename itself is an entry of the folder).
Used for every file of the stage that a later run or the pack stage trusts by its name (pack_stage
has its own copy of these few lines: a service depends on another only through its public module).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the file's own fsync still holds
        pass
    finally:
        os.close(fd)


def durable_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """os.replace(tmp, path) with tmp's data on disk before the name and the name after it."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


def write_json_atomic(path: Path, data: dict) -> None:
    """`data` as JSON under a temporary name, then durable_replace: a reader never sees half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")
    durable_replace(tmp, path)
