"""Finding checkpoints: the complete ones (marker present) under a save folder and its snapshot
folder, newest step first. A folder without its marker is incomplete and is passed over with a
warning; which of the complete ones is also intact is decided when it is read (restore.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import layout
from .locations import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    location: Location
    step: int
    kind: str  # "checkpoint" | "snapshot"


def marker_of(folder: Location) -> int | None:
    steps = [step for name in folder.files() if (step := layout.marker_step(name)) is not None]
    return max(steps) if steps else None


def complete_checkpoints(save: Location, snapshot: Location | None = None) -> list[Candidate]:
    found: list[Candidate] = []
    for name in save.subfolders():
        if not name.isdigit():
            continue
        folder = save.child(name)
        step = marker_of(folder)
        if step is None:
            log.warning(
                "skipping checkpoint %s: no %s marker (incomplete: the run stopped while saving it?)",
                folder.uri,
                layout.marker_name(int(name)),
            )
            continue
        found.append(Candidate(folder, step, "checkpoint"))
    if snapshot is not None:
        for slot in layout.SNAPSHOT_SLOTS:
            folder = snapshot.child(slot)
            if not folder.files():
                continue
            step = marker_of(folder)
            if step is None:
                log.warning("skipping snapshot %s: no marker (incomplete)", folder.uri)
                continue
            found.append(Candidate(folder, step, "snapshot"))
    # Newest first; at equal steps the numbered checkpoint before the snapshot.
    return sorted(found, key=lambda c: (c.step, c.kind == "checkpoint"), reverse=True)
