"""Public contract of the metrics service: the trainer's side of it.

Rank 0 appends one JSON object per line to ``<run_dir>/metrics.jsonl`` and flushes it, so the
sidecar (another process, maybe another host) can tail the file; the trainer never waits on the
network. Record kinds (the ``kind`` field):

- ``params``: once per (re)start, ``params`` holds the flattened config, ``tags`` run tags,
  ``step`` the first step this start trains (0: a fresh start, nothing resumed; the sidecar then
  opens a new MLflow run) and ``start_id``, a key the emitter makes per trainer start (it names
  that start's segment of the file in the sidecar's mlflow_run.json);
- ``train``: one per step: ``step``, ``time`` (unix seconds) and every field of the log line;
- ``valid``: ``step``, ``time`` and ``val/...`` fields after a validation pass;
- ``event``: ``step``, ``time``, ``event`` (its name, e.g. ``rollback``) and its fields; the
  sidecar forwards the numeric ones as metrics (a dict's keys joined with '/').
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from metrics.redact import redact_values

METRICS_FILE = "metrics.jsonl"


class MetricsEmitter:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.start_id = uuid.uuid4().hex  # one emitter per trainer start: names that start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._ends_mid_line():
            # A previous run died mid-write: end its fragment so it stays a line of its own (the
            # sidecar reports and skips it) instead of spoiling this run's first record.
            self._file.write("\n")
            self._file.flush()

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                return False
            handle.seek(-1, 2)
            return handle.read(1) != b"\n"

    def emit(self, kind: str, record: dict[str, Any]) -> None:
        """One record as one line, flushed (about 10 us for a 30-field step record; see
        BENCHMARKS.md). NaN and infinities are written as JSON's NaN / Infinity (Python's json).
        A params record's URIs with credentials (the config's tracking URI) are written redacted."""
        if kind == "params":
            redacted = {k: redact_values(record[k]) for k in ("params", "tags") if k in record}
            record = {"start_id": self.start_id, **record, **redacted}
        line = json.dumps({"kind": kind, "time": round(time.time(), 3), **record}, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
