"""Files that are whole or absent under their name, even after a crash or a power cut.

A file is written under a temporary name beside its target, fsynced, renamed over the target, and
the folder is fsynced (the rename is an entry of the folder): a reader that finds the name finds
the whole file. Every file the trainer writes for a later run to trust (model weights, checkpoint
files and manifests, the `<step>.step` markers of local saves) goes through `atomic_write`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
