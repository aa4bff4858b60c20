"""The uploader's own folders and files (spool, journal) belong to its user and no one else may
write them: whoever can write a spool or a journal decides what is uploaded where. Created 0700
(files 0600); an existing one owned by another user or writable by group or others is refused with
a message that says how to fix it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class OwnershipError(OSError):
    """A spool or journal this process may not trust; the message names the path and the fix."""


def check_private(path: Path, what: str) -> None:
    """`path` (which exists) belongs to this user and is writable by no one else."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OwnershipError(f"{what} {path} is a symbolic link; give the real folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise OwnershipError(
            f"{what} {path} belongs to user id {info.st_uid}, not to this user ({os.getuid()}): another "
            f"user could decide what is uploaded where; use a {what} of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OwnershipError(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod go-w {path}` or use a {what} of your own"
        )


def private_folder(path: Path, what: str) -> Path:
    """Creates `path` (0700, parents as needed) or checks the existing one."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    check_private(path, what)
    return path
