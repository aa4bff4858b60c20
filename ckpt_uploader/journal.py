"""The job journal: an append-only JSONL file, fsynced after every record, so that a job the
uploader acknowledged survives a SIGKILL and is finished by the next uploader on the same journal.

Records: {"event": "submit", "job": {...}}, {"event": "file_done", "job_id", "name"},
{"event": "done", "job_id"}, {"event": "failed", "job_id", "error"}. A torn last line (a crash
while appending) is ignored: it belonged to a request that was never acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_uploader.durable import AtomicWriter, fsync_folder
from ckpt_uploader.ownership import check_private, private_folder
from ckpt_uploader.protocol import JobSpec, job_spec_from_dict

log = logging.getLogger(__name__)


class JournalError(RuntimeError):
    pass


@dataclass
class JournaledJob:
    spec: JobSpec
    state: str = "queued"  # queued | done | failed (uploading is a runtime state, never journaled)
    error: str | None = None
    files_done: set[str] = field(default_factory=set)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.parent.exists():
            private_folder(self.path.parent, "journal folder")
        if self.path.exists():
            check_private(self.path, "journal")
        self._lock = threading.Lock()
        self._handle = None

    def replay(self) -> dict[str, JournaledJob]:
        """Jobs in submission order, as the records left them."""
        jobs: dict[str, JournaledJob] = {}
        if not self.path.exists():
            return jobs
        lines = self.path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self._apply(jobs, record)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
                if number == len(lines):  # no newline after it: torn by a crash mid-append
                    log.warning("%s:%d: ignoring a torn last record (%s)", self.path, number, error)
                    self._truncate_torn_tail(len(b"\n".join(lines[: number - 1])) + (1 if number > 1 else 0))
                    break
                raise JournalError(
                    f"{self.path}:{number}: unreadable journal record ({error}); "
                    "move the file away to start with an empty journal"
                ) from None
        return jobs

    @staticmethod
    def _apply(jobs: dict[str, JournaledJob], record: dict) -> None:
        event = record["event"]
        if event == "submit":
            spec = job_spec_from_dict(record["job"])
            jobs[spec.job_id] = JournaledJob(spec)  # a resubmitted failed job starts again
        elif event == "file_done":
            jobs[record["job_id"]].files_done.add(record["name"])
        elif event == "done":
            jobs[record["job_id"]].state = "done"
        elif event == "failed":
            job = jobs[record["job_id"]]
            job.state, job.error = "failed", record["error"]
        else:
            raise KeyError(f"unknown event {event!r}")

    def _truncate_torn_tail(self, keep_bytes: int) -> None:
        with open(self.path, "r+b") as handle:
            handle.truncate(keep_bytes)
            os.fsync(handle.fileno())

    def append(self, record: dict) -> None:
        """Returns once the record is on disk (write + fsync)."""
        line = (
            json.dumps({**record, "t": round(time.time(), 3)}, separators=(",", ":")).encode("utf-8") + b"\n"
        )
        with self._lock:
            if self._handle is None:
                created = not self.path.exists()
                # 0600: the journal says what goes where, so no one else may write it.
                self._handle = os.fdopen(
                    os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab"
                )
                if created:
                    fsync_folder(self.path.parent)
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def rewrite(self, records: list[dict]) -> None:
        """Replaces the journal by `records` atomically (a new file, fsynced, renamed over it, the
        folder fsynced): a crash at any moment leaves the old journal or the new one, whole."""
        temp = self.path.with_name(f".{self.path.name}.compact")
        data = b"".join(
            json.dumps({**record, "t": round(time.time(), 3)}, separators=(",", ":")).encode("utf-8") + b"\n"
            for record in records
        )
        with self._lock:
            with AtomicWriter(self.path, temp=temp, mode=0o600) as handle:  # 0600, as append creates it
                handle.write(data)
            if self._handle is not None:  # appends go to the new file from now on
                self._handle.close()
                self._handle = None

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
