"""The uploader service: a ROUTER socket answering requests in one thread while the JobRunner
uploads in others. ``wait`` requests are parked (ROUTER lets us answer them later, in any order)
and answered when their job ends or their timeout passes, so a waiting trainer never blocks the
others."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ckpt_uploader.allowed import AllowedDestinations
from ckpt_uploader.curve import secure_server_socket
from ckpt_uploader.jobs import JobRunner, TransferOptions
from ckpt_uploader.journal import Journal
from ckpt_uploader.protocol import (
    MAX_MESSAGE_BYTES,
    ProtocolError,
    decode_request,
    encode,
    error_reply,
    job_id_of,
    parse_job_spec,
)
from ckpt_uploader.spool import Spool

log = logging.getLogger(__name__)

_POLL_MS = 50
MAX_PARKED_WAITS = 10_000  # `wait` requests held at once; past it a wait is answered "busy"
LISTENING = "ckpt-uploader listening on "  # the line embedded.py reads to learn the port


@dataclass
class _Waiter:
    envelope: list[bytes]
    job_id: str
    deadline: float


@dataclass(frozen=True)
class ServeOptions:
    bind: str
    spool: Path
    allowed_destinations: tuple[str, ...]  # storage URI prefixes jobs may write under (--allow-dst)
    journal: Path | None = None  # default: <spool>/.ckpt-uploader-journal.jsonl
    curve_keys: Path | None = None
    transfer: TransferOptions = field(default_factory=TransferOptions)
    parent_pid: int | None = None  # exit when this process is gone (embedded uploaders)
    stop_wait_s: float = 0.0  # on SIGTERM / SIGINT: how long unfinished jobs may still run


def serve(options: ServeOptions) -> None:
    allowed = AllowedDestinations(options.allowed_destinations)
    spool = Spool(options.spool)
    journal = Journal(options.journal or spool.root / ".ckpt-uploader-journal.jsonl")
    runner = JobRunner(spool, journal, options.transfer, allowed)
    runner.start()

    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.linger = 0
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    authenticator = secure_server_socket(context, socket, options.curve_keys) if options.curve_keys else None
    socket.bind(options.bind)
    endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"{LISTENING}{endpoint}", flush=True)
    log.info(
        "spool %s, journal %s, destinations %s, %d worker(s)%s",
        spool.root,
        journal.path,
        allowed,
        options.transfer.workers,
        ", CURVE on" if authenticator else "",
    )

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    waiters: list[_Waiter] = []
    stop_by: float | None = None  # set at the first signal: the end of the drain
    try:
        while True:
            if stopping and stop_by is None:
                stop_by = time.monotonic() + options.stop_wait_s
                if _unfinished(runner) and options.stop_wait_s > 0:
                    log.info(
                        "stopping: new jobs are refused; waiting up to %.0f s for %d unfinished job(s)",
                        options.stop_wait_s,
                        len(_unfinished(runner)),
                    )
            if stop_by is not None and (time.monotonic() >= stop_by or not _unfinished(runner)):
                break
            if socket.poll(_POLL_MS):
                frames = socket.recv_multipart()
                reply = _handle(frames, runner, waiters, accepting=stop_by is None)
                if reply is not None:
                    socket.send_multipart([*_envelope(frames), reply])
            waiters[:] = [w for w in waiters if not _answer_if_ready(socket, runner, w)]
            if options.parent_pid and not _alive(options.parent_pid):
                log.warning(
                    "parent process %d is gone; stopping (unfinished jobs stay in the journal)",
                    options.parent_pid,
                )
                break
        _report_unfinished(runner, journal)
    finally:
        log.info("stopping")
        socket.close(0)
        if authenticator:
            authenticator.stop()
        context.term()
        journal.close()


def _envelope(frames: list[bytes]) -> list[bytes]:
    """The routing frames up to and including the empty delimiter (REQ clients send one)."""
    if b"" in frames:
        return frames[: frames.index(b"") + 1]
    return frames[:1]


def _unfinished(runner: JobRunner) -> list[dict]:
    return [job for job in runner.status() if job["state"] not in ("done", "failed")]


def _report_unfinished(runner: JobRunner, journal: Journal) -> None:
    """What a stop leaves behind: every job still queued, uploading or retrying. Nothing is lost:
    each stays in the journal (and its files in the spool) for the next start on this journal."""
    left = _unfinished(runner)
    if not left:
        return
    log.warning("%d job(s) unfinished; they resume when an uploader starts on %s:", len(left), journal.path)
    for job in left:
        log.warning(
            "  %s -> %s: %s, %.1f of %.1f MB%s",
            job["job_id"],
            job["dst"],
            job["state"],
            job["bytes_done"] / 1e6,
            job["bytes_total"] / 1e6,
            f" ({job['error']})" if job["error"] else "",
        )


def _handle(
    frames: list[bytes], runner: JobRunner, waiters: list[_Waiter], accepting: bool = True
) -> bytes | None:
    body = frames[len(_envelope(frames)) :]
    if len(body) != 1:
        return error_reply(f"malformed request: expected one frame holding a JSON object, got {len(body)}")
    try:
        message = decode_request(body[0])
        op = message["op"]
        if op == "ping":
            return encode({"ok": True, "op": "pong", "pid": os.getpid()})
        if op == "submit":
            spec = parse_job_spec(message)
            if not accepting:
                raise ProtocolError("the uploader is stopping: it takes no new jobs")
            runner.submit(spec)
            return encode({"ok": True, "op": "accepted", "job_id": spec.job_id})
        if op == "status":
            if message.get("job_id") is None:
                return encode({"ok": True, "jobs": runner.status()})
            return encode({"ok": True, "job": runner.status(job_id_of(message))})
        # wait
        job_id = job_id_of(message)
        runner.status(job_id)  # unknown job -> error now
        timeout = message.get("timeout", 0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
            raise ProtocolError(f"timeout: expected seconds >= 0, got {timeout!r}")
        if len(waiters) >= MAX_PARKED_WAITS:
            raise ProtocolError(
                f"busy: {len(waiters)} waits are parked (limit {MAX_PARKED_WAITS}); try again later"
            )
        waiters.append(_Waiter(_envelope(frames), job_id, time.monotonic() + timeout))
        return None
    except (ProtocolError, ValueError) as error:
        return error_reply(str(error))
    except OSError as error:  # the journal could not be written: the job is NOT accepted
        log.error("request failed: %s", error)
        return error_reply(f"uploader I/O error, request not accepted: {error}")
    except Exception as error:  # noqa: BLE001 - one request, however odd, never stops the service
        log.exception("request failed unexpectedly")
        return error_reply(f"request failed: {type(error).__name__}: {error}")


def _answer_if_ready(socket: zmq.Socket, runner: JobRunner, waiter: _Waiter) -> bool:
    status = runner.status(waiter.job_id)
    finished = status["state"] in ("done", "failed")
    if not finished and time.monotonic() < waiter.deadline:
        return False
    socket.send_multipart([*waiter.envelope, encode({"ok": True, "job": status, "timed_out": not finished})])
    return True


def _alive(parent_pid: int) -> bool:
    """True while the process that started us is still our parent (we are re-parented when it dies)."""
    return os.getppid() == parent_pid
