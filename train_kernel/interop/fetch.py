"""A checkpoint folder at a storage URI (local:, boto3:s3://..., a path) as a local folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from train_kernel.checkpoint.locations import Location


def local_folder(location: Location, wanted: Callable[[str], bool], scratch: Path) -> Path:
    """The folder itself when it is local; else a copy under `scratch` of the files whose names
    pass `wanted` (only those: an object-store folder may hold much else)."""
    if location.local_path is not None:
        return location.local_path
    names = [name for name in location.files() if wanted(name)]
    if not names:
        raise FileNotFoundError(f"{location.uri}: no files of a model checkpoint there")
    for name in names:
        location.fetch(name, scratch)
    return scratch
