"""Renames that survive a power loss: the data first, then the name.

A rename alone can reach the disk before the file's blocks: after a crash a part is there under
its final name, with a hole or nothing inside. So the file is fsynced before the rename, and its
folder after it (the rename itself is an entry of the folder). Used for every file of a pack:
parts, documents and the manifest, which is what tells a finished pack from an interrupted one.
"""

from __future__ import annotations

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
