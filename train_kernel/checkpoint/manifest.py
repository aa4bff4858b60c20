"""The manifest of a checkpoint: every file with its size and sha256, and what wrote it. A reader
trusts a file only when both match; that is how a corrupt or truncated checkpoint is told apart."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .layout import FORMAT

_CHUNK = 8 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the file."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    step: int
    files: tuple[FileEntry, ...]
    layout: dict
    created: float

    def entry(self, name: str) -> FileEntry | None:
        return next((entry for entry in self.files if entry.name == name), None)

    def names(self) -> list[str]:
        return [entry.name for entry in self.files]

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "step": self.step,
            "layout": self.layout,
            "created": self.created,
            "files": [asdict(entry) for entry in sorted(self.files, key=lambda e: e.name)],
        }
        return json.dumps(body, indent=1).encode()

    @staticmethod
    def parse(data: bytes, source: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise CheckpointError(
                    f"{source}: format {body.get('format')!r}, expected {FORMAT!r} "
                    "(a checkpoint of another layout)"
                )
            files = tuple(FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in body["files"])
            return Manifest(int(body["step"]), files, dict(body["layout"]), float(body["created"]))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{source}: unreadable manifest ({error})") from error


def verify_file(path: Path, entry: FileEntry, folder: str) -> None:
    """Raises CheckpointError naming the file when it is missing, short or changed."""
    if not path.is_file():
        raise CheckpointError(f"{folder}: {entry.name} is missing")
    size = path.stat().st_size
    if size != entry.size:
        raise CheckpointError(f"{folder}: {entry.name} has {size:,} bytes, the manifest says {entry.size:,}")
    if sha256_of(path) != entry.sha256:
        raise CheckpointError(f"{folder}: {entry.name} does not match its sha256 in the manifest (corrupt)")
