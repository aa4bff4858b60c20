"""The uploader's wire protocol: one JSON object per ZeroMQ frame, versioned.

Request:  {"v": 1, "op": "ping" | "submit" | "status" | "wait", ...fields}
Reply:    {"v": 1, "ok": true, ...}  or  {"v": 1, "ok": false, "error": "<what is wrong>"}

- submit{job_id, src, dst, files: [{name, size, sha256}], marker} -> {ok, op: "accepted", job_id},
  sent only once the job is in the journal (fsynced).
- status{job_id} -> {ok, job: {job_id, state, bytes_done, bytes_total, error, dst, marker, attempts,
  retry_until, next_attempt_at}} (state "retrying": the store is out, the job is tried again until
  retry_until, unix time);
  status{} -> {ok, jobs: [...]}.
- wait{job_id, timeout} -> the status reply plus "timed_out", once the job is done or failed or
  ``timeout`` seconds have passed.
- ping -> {ok, op: "pong"}.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

PROTOCOL_VERSION = 1
STATES = ("queued", "uploading", "retrying", "done", "failed")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class ProtocolError(ValueError):
    """A request that cannot be served; the message goes back to the client."""


@dataclass(frozen=True)
class FileEntry:
    name: str  # path relative to the job's src folder, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    src: str  # folder relative to the spool
    dst: str  # storage URI of the destination folder
    files: tuple[FileEntry, ...]
    marker: str  # "<step>.step", written last into dst

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return data


# A request's largest frame: a submit lists each file in about 150 bytes, so 16 MiB holds a
# checkpoint of ~100,000 files. ZeroMQ itself drops peers whose messages pass MAX_MESSAGE_BYTES
# (set on the socket), before they take memory; between the two the peer gets an error reply.
MAX_REQUEST_BYTES = 16 * 2**20
MAX_MESSAGE_BYTES = 64 * 2**20


def encode(message: dict) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":")).encode("utf-8")


def error_reply(text: str) -> bytes:
    # Cut: messages quote the peer's values, and a peer may send megabytes of them.
    return encode({"ok": False, "error": text if len(text) <= 2000 else text[:2000] + "..."})


def decode_request(frame: bytes) -> dict:
    """Parses a request frame and checks its version and op; the op's fields are checked by
    ``parse_job_spec`` and the server."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise ProtocolError(
            f"request too large: {len(frame):,} bytes; this uploader takes at most {MAX_REQUEST_BYTES:,}"
        )
    try:
        message = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"malformed request: not a UTF-8 JSON object ({error})") from None
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise ProtocolError("malformed request: JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"malformed request: expected a JSON object, got {type(message).__name__}")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r}; this uploader speaks v={PROTOCOL_VERSION}"
        )
    if message.get("op") not in ("ping", "submit", "status", "wait"):
        raise ProtocolError(f"unknown op {message.get('op')!r}; expected ping, submit, status or wait")
    return message


def check_relative_path(text: object, field: str) -> str:
    """A '/'-separated relative path with no '..', '.', or empty parts (the lexical half of the
    spool check; the server also resolves symlinks)."""
    if not isinstance(text, str) or not text:
        raise ProtocolError(f"{field}: expected a non-empty relative path, got {text!r}")
    if text.startswith("/") or "\\" in text or "\x00" in text:
        raise ProtocolError(f"{field}: {text!r} must be a relative path under the spool")
    if any(part in ("", ".", "..") for part in text.split("/")):
        raise ProtocolError(f"{field}: {text!r} may not contain '..', '.' or empty parts")
    return text


def job_id_of(message: dict) -> str:
    job_id = message.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ProtocolError(f"job_id: expected 1-200 characters of [A-Za-z0-9._-], got {job_id!r}")
    return job_id


def parse_job_spec(message: dict) -> JobSpec:
    for field in ("job_id", "src", "dst", "files", "marker"):
        if field not in message:
            raise ProtocolError(f"submit: missing field {field!r}")
    job_id = job_id_of(message)
    src = check_relative_path(message["src"], "src")
    dst = message["dst"]
    if not isinstance(dst, str) or not dst:
        raise ProtocolError(f"dst: expected a storage URI string, got {dst!r}")
    marker = message["marker"]
    if not isinstance(marker, str) or "/" in marker or not marker.endswith(".step") or marker in (".step",):
        raise ProtocolError(f"marker: expected a file name '<step>.step', got {marker!r}")
    files = message["files"]
    if not isinstance(files, list) or not files:
        raise ProtocolError("files: expected a non-empty list of {name, size, sha256}")
    entries, seen = [], set()
    for index, item in enumerate(files):
        if not isinstance(item, dict):
            raise ProtocolError(f"files[{index}]: expected an object {{name, size, sha256}}")
        name = check_relative_path(item.get("name"), f"files[{index}].name")
        size, sha256 = item.get("size"), item.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"files[{index}].size: expected a byte count >= 0, got {size!r}")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise ProtocolError(f"files[{index}].sha256: expected 64 hex digits, got {sha256!r}")
        if name in seen or name == marker:
            raise ProtocolError(f"files[{index}].name: {name!r} is listed twice or clashes with the marker")
        seen.add(name)
        entries.append(FileEntry(name, size, sha256.lower()))
    return JobSpec(job_id, src, dst, tuple(entries), marker)


def job_spec_from_dict(data: dict) -> JobSpec:
    """Inverse of JobSpec.to_dict (journal records)."""
    return JobSpec(
        data["job_id"], data["src"], data["dst"], tuple(FileEntry(**f) for f in data["files"]), data["marker"]
    )
