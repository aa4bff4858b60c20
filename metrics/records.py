"""Reading the trainer's records: complete lines of `metrics.jsonl` from a byte offset, parsed into
records, and records turned into MLflow metrics and params.

A line without its newline is still being written: it is left for the next read, never an error.
A line that is not a JSON object with a known `kind` is reported with its line number and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("params", "train", "valid", "event")
# A longer line is skipped (reported with its number) and never held whole.
MAX_RECORD_BYTES = 16 << 20
# Fields of a step record that are not metrics.
NOT_METRICS = frozenset({"kind", "time", "step"})
# MLflow's steps and timestamps are 64-bit: a larger one fails in its client (not a 4xx).
MAX_INT64 = (1 << 63) - 1


@dataclass
class Record:
    kind: str
    line: int  # 1-based line number in metrics.jsonl
    end_offset: int  # byte offset just past this line
    data: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.data["step"])

    @property
    def timestamp_ms(self) -> int:
        return int(round(float(self.data.get("time", 0.0)) * 1000))

    @property
    def fresh_start(self) -> str | None:
        """For a params record of a trainer start that loaded nothing (`"step": 0`): the key of
        that start (its `start_id`, or for trainers that wrote none a hash of the record), which
        names the MLflow run it opens. None for any other record: a resumed start (step > 0) or a
        params record without a step (older trainers) continues the MLflow run before it."""
        step = self.data.get("step")
        if self.kind != "params" or isinstance(step, bool) or step != 0:
            return None
        start_id = self.data.get("start_id")
        if isinstance(start_id, str) and start_id:
            return start_id
        text = json.dumps(self.data, sort_keys=True, default=str)
        return "sha1:" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def flatten(value: Any, prefix: str, out: dict[str, Any], sep: str) -> dict[str, Any]:
    """Nested dicts become `prefix<sep>key` entries."""
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(inner, f"{prefix}{sep}{key}" if prefix else str(key), out, sep)
    else:
        out[prefix] = value
    return out


def metrics_of(record: Record) -> dict[str, float]:
    """Every numeric field of a train/valid record (dicts flattened with '/'), NaN and inf
    included (MLflow stores them); booleans, strings and nulls are not metrics."""
    flat: dict[str, Any] = {}
    for key, value in record.data.items():
        if key not in NOT_METRICS:
            flatten(value, key, flat, "/")
    return {
        key: float(value)
        for key, value in flat.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def param_value(value: Any, max_length: int) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )
    if len(text) > max_length:
        marker = "...(truncated)"
        text = text[: max_length - len(marker)] + marker
    return text


def _parse(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)  # the stdlib parser: the trainer writes NaN for empty types
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    if data["kind"] != "params":
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return None
    return data


def _poison(record: Record) -> str | None:
    """Why a parsed record cannot be forwarded (a number beyond float range, a time that is not a
    number, nesting past the flattener's reach), or None."""
    time = record.data.get("time", 0.0)
    if isinstance(time, bool) or not isinstance(time, (int, float)):
        return f"time is {type(time).__name__}, not a number"
    try:
        if abs(record.timestamp_ms) > MAX_INT64:
            return f"time {time} is beyond MLflow's 64-bit timestamps"
        metrics_of(record)
    except (OverflowError, ValueError, RecursionError) as error:
        return f"not forwardable ({type(error).__name__}: {str(error)[:80]})"
    if record.kind != "params" and record.step > MAX_INT64:
        return f"step {record.step} is beyond MLflow's 64-bit steps"
    return None


@dataclass
class JsonlReader:
    """Reads the complete lines of a growing JSONL file from `offset` (with `line` lines before
    it). Keeps its position between calls, so it tails the file."""

    path: Path
    offset: int = 0
    line: int = 0
    skipped: list[int] = field(default_factory=list)

    def read(self, max_records: int) -> list[Record]:
        """Up to `max_records` records from the complete lines after the current position."""
        records: list[Record] = []
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return records
        with handle:
            size = handle.seek(0, 2)
            if size < self.offset:
                log.warning(
                    "%s shrank below the read offset %d (replaced?); reading it from the start",
                    self.path,
                    self.offset,
                )
                self.offset, self.line = 0, 0
            handle.seek(self.offset)
            for raw in _complete_lines(handle, max_line=MAX_RECORD_BYTES):
                self.line += 1
                if isinstance(raw, int):  # a line over MAX_RECORD_BYTES, read through
                    self.offset += raw
                    log.warning("%s:%d: a line of %d bytes; skipped", self.path, self.line, raw)
                    self.skipped.append(self.line)
                    continue
                self.offset += len(raw)
                record = self._record(raw)
                if record is not None:
                    records.append(record)
                    if len(records) >= max_records:
                        break
        return records

    def _record(self, raw: bytes) -> Record | None:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            return None
        data = _parse(text)
        if data is None:
            # A trainer killed mid-write leaves a fragment that the next record's text follows on
            # the same line: recover that record.
            start = text.rfind('{"kind"')
            data = _parse(text[start:]) if start > 0 else None
            log.warning(
                "%s:%d: not a metrics record (%s); skipped%s",
                self.path,
                self.line,
                text[:80] + ("..." if len(text) > 80 else ""),
                "" if data is None else " up to the record that follows it on the same line",
            )
            self.skipped.append(self.line)
            if data is None:
                return None
        record = Record(data["kind"], self.line, self.offset, data)
        problem = _poison(record)
        if problem is not None:
            log.warning("%s:%d: %s; skipped", self.path, self.line, problem)
            self.skipped.append(self.line)
            return None
        return record

    def pending_bytes(self) -> int:
        """Bytes after the position (a partial last line, or lines not read yet)."""
        try:
            return max(0, self.path.stat().st_size - self.offset)
        except FileNotFoundError:
            return 0


def _complete_lines(handle, chunk_size: int = 1 << 20, max_line: int | None = None) -> Iterator[bytes | int]:
    """The newline-terminated lines from the handle's position; a trailing partial line is not
    yielded (it is still being written). A line longer than `max_line` is read through without
    being kept and yields its length (an int) once its newline comes."""
    rest = b""
    dropped = 0  # bytes of an overlong line seen so far, not kept
    while True:
        chunk = handle.read(chunk_size)
        if not chunk:
            return
        data = rest + chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if dropped:
                yield dropped + end + 1 - start
                dropped = 0
            else:
                yield data[start : end + 1]
            start = end + 1
        rest = data[start:]
        if max_line is not None and dropped + len(rest) > max_line:
            dropped += len(rest)
            rest = b""
