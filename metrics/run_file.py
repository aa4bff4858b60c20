"""`<run_dir>/mlflow_run.json`: which MLflow run each part of metrics.jsonl goes to.

A run folder can hold several training runs: every trainer start that loaded nothing (a params
record with `"step": 0`) opens a new part of the file, a *segment*, and a new MLflow run; a
resumed start continues the segment before it. The file names each segment's run so that a
sidecar re-reading the file from any point sends each segment to its own run, exactly once:

    {"tracking_uri": "http://host:5000", "experiment": "llm-pretrain",
     "runs": [{"start": "<start id>", "run_key": "<hex>", "run_id": "<MLflow run id>"}, ...],
     "run_key": ..., "run_id": ...}            # the newest run's, for people and older tools

`start` is the start id of the params record that opened the segment (None: the file's first
segment, as a sidecar that knew no segments recorded it). An entry with its `run_key` is written
durably before its MLflow run is created (the run carries the key as tag `sidecar_run_key`), so
a sidecar killed in between finds the run by its key instead of making a second one. The tracking
URI is stored redacted (no credentials).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"


@dataclass
class RunEntry:
    start: str | None
    run_key: str
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "run_key": self.run_key, "run_id": self.run_id}


def write_durably(path: Path, data: dict) -> None:
    """Replaces `path` atomically and fsyncs the file and its folder: it survives a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunFile:
    def __init__(self, path: Path, data: dict[str, Any], runs: list[RunEntry]) -> None:
        self.path = path
        self.tracking_uri: str | None = data.get("tracking_uri")
        self.experiment: str | None = data.get("experiment")
        self.runs = runs

    @classmethod
    def load(cls, run_dir: Path) -> RunFile:
        path = run_dir / RUN_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        runs = [
            RunEntry(r.get("start"), r["run_key"], r.get("run_id"))
            for r in data.get("runs") or []
            if isinstance(r, dict) and r.get("run_key")
        ]
        if not runs and data.get("run_key"):
            # Written by a sidecar before segments: its one run holds the file's first segment.
            runs = [RunEntry(None, data["run_key"], data.get("run_id"))]
        return cls(path, data, runs)

    def find(self, start: str) -> RunEntry | None:
        return next((entry for entry in self.runs if entry.start == start), None)

    def by_key(self, run_key: str) -> RunEntry | None:
        return next((entry for entry in self.runs if entry.run_key == run_key), None)

    def by_run_id(self, run_id: str) -> RunEntry | None:
        return next((entry for entry in self.runs if entry.run_id == run_id), None)

    def entry_for(self, start: str, first_of_file: bool) -> RunEntry:
        """The entry of the segment opened by `start`: a known one; for the file's first segment
        the entry a pre-segment sidecar wrote; else a new one, saved before its run exists."""
        entry = self.find(start)
        if entry is None and first_of_file:
            entry = self.find_unbound()
            if entry is not None:
                entry.start = start
                self.save()
        if entry is None:
            entry = RunEntry(start, uuid.uuid4().hex)
            self.runs.append(entry)
            self.save()
        return entry

    def find_unbound(self) -> RunEntry | None:
        return next((entry for entry in self.runs if entry.start is None), None)

    def set_run(self, entry: RunEntry, run_id: str, tracking_uri: str, experiment: str | None) -> None:
        unchanged = (entry.run_id, self.tracking_uri) == (run_id, tracking_uri)
        if unchanged and experiment in (None, self.experiment):
            return
        entry.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment = experiment or self.experiment
        self.save()

    def save(self) -> None:
        data: dict[str, Any] = {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "runs": [entry.to_json() for entry in self.runs],
        }
        if self.runs:
            data["run_key"] = self.runs[-1].run_key
            if self.runs[-1].run_id:
                data["run_id"] = self.runs[-1].run_id
        write_durably(self.path, data)
