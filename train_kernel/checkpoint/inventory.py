"""What a checkpoint folder holds, for people: every step folder and snapshot with its state
(complete, incomplete, damaged), its step, size and the layout that wrote it (data, zero1,
pipeline, num_chunks, tensor: any other layout can resume it), and with `verify` the sha256 of every file
checked against the manifest (`train-kernel checkpoints`)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .capture import describe_layout
from .discovery import marker_of
from .locations import Location, open_location
from .manifest import CheckpointError, verify_file
from .restore import read_manifest


@dataclass(frozen=True)
class CheckpointEntry:
    uri: str
    kind: str  # checkpoint | snapshot
    step: int | None  # from the marker (None: incomplete)
    state: str  # complete | incomplete | damaged | intact (verified)
    size_bytes: int
    detail: str = ""
    layout: dict | None = None  # the manifest's: data, zero, pipeline, num_chunks, tensor


def _folders(root: Location) -> list[tuple[str, Location]]:
    found = [("checkpoint", root.child(name)) for name in root.subfolders() if name.isdigit()]
    found.sort(key=lambda item: int(item[1].uri.rstrip("/").rsplit("/", 1)[-1]))
    snapshots = root.child("snapshot")
    found += [
        ("snapshot", snapshots.child(slot)) for slot in layout.SNAPSHOT_SLOTS if snapshots.child(slot).files()
    ]
    return found


def _check(folder: Location, verify: bool, scratch: Path) -> tuple[str, int, str, dict | None]:
    step = marker_of(folder)
    try:
        manifest = read_manifest(folder)
    except CheckpointError as error:
        return ("incomplete" if step is None else "damaged"), 0, str(error), None
    size = sum(entry.size for entry in manifest.files)
    if step is None:
        return "incomplete", size, "no marker: the save did not finish", manifest.layout
    if not verify:
        return "complete", size, "", manifest.layout
    try:
        for entry in manifest.files:
            verify_file(folder.fetch(entry.name, scratch), entry, folder.uri)
    except (CheckpointError, OSError) as error:
        return "damaged", size, str(error), manifest.layout
    finally:
        if folder.local_path is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return "intact", size, "every file matches its sha256", manifest.layout


def inventory(uri: str, verify: bool = False) -> list[CheckpointEntry]:
    root = open_location(uri)
    entries = []
    with tempfile.TemporaryDirectory(prefix="ckpt-verify-") as scratch:
        for kind, folder in _folders(root):
            state, size, detail, saved = _check(folder, verify, Path(scratch) / "files")
            entries.append(CheckpointEntry(folder.uri, kind, marker_of(folder), state, size, detail, saved))
    return entries


def format_inventory(entries: list[CheckpointEntry]) -> str:
    if not entries:
        return "no checkpoints"
    lines = [f"{'step':>8}  {'kind':<10}  {'state':<10}  {'size':>10}  folder  layout"]
    for entry in entries:
        step = "-" if entry.step is None else str(entry.step)
        size = f"{entry.size_bytes / 1e6:,.1f} MB"
        line = f"{step:>8}  {entry.kind:<10}  {entry.state:<10}  {size:>10}  {entry.uri}"
        if entry.layout is not None:
            line += f"  {describe_layout(entry.layout)}"
        if entry.detail and entry.state not in ("complete", "intact"):
            line += f"\n{'':>8}  {entry.detail}"
        lines.append(line)
    usable = [e for e in entries if e.state in ("complete", "intact")]
    if usable:
        newest = max(usable, key=lambda e: e.step)
        lines.append(f"auto_resume would start from step {newest.step}: {newest.uri}")
    return "\n".join(lines)
