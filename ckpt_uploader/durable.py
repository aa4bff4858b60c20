"""Files that are whole or absent under their name, even after a crash or a power cut: written
under a temporary name, fsynced, renamed over the target, and the folder fsynced (the rename is an
entry of the folder). Used by the local store for every object it writes and by the journal."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicWriter:
    """temp file -> fsync -> rename -> fsync(folder); the temp file is removed on any error.

    `with AtomicWriter(target) as handle: handle.write(...)`. The temporary name is `temp`, by
    default a hidden `.partial-` name beside the target (stores leave such names out of listings);
    `mode` is the new file's permission bits (before the umask), 0o666 as open() uses."""

    def __init__(self, target: Path, temp: Path | None = None, mode: int = 0o666) -> None:
        self.target = target
        default = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.temp = temp if temp is not None else default
        self.mode = mode

    def __enter__(self):
        self.handle = os.fdopen(os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.mode), "wb")
        return self.handle

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if kind is None:
                os.replace(self.temp, self.target)
                fsync_folder(self.target.parent)
        finally:
            if self.temp.exists():
                self.temp.unlink()
