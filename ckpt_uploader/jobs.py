"""Runs upload jobs, one job at a time in submission order (the trainer's "previous upload
finished" rule relies on that order), with the files of a job and the parts of each file sent in
parallel.

A job: check the spool files -> check the destination is reachable -> remove stale `*.step`
markers from the destination folder -> upload and verify every file -> write the marker LAST ->
journal "done" -> delete the spool copy.

An outage (a TransientStoreError: S3 unreachable, failing or throttling through every botocore
retry) does not fail the job: it goes to state "retrying", keeps its spool copy and is tried again,
with growing pauses, until `outage_deadline_s` after the outage began; only then it fails. Jobs
behind it wait: they go to the same store, and the order is the trainer's contract.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_uploader.allowed import AllowedDestinations
from ckpt_uploader.journal import Journal
from ckpt_uploader.protocol import JobSpec, ProtocolError
from ckpt_uploader.spool import Spool
from ckpt_uploader.stores import (
    DEFAULT_PART_SIZE_BYTES,
    RetryPolicy,
    Store,
    StoreError,
    TransientStoreError,
    open_store,
)
from ckpt_uploader.uri import StorageURIError

log = logging.getLogger(__name__)
_STEP_MARKER = re.compile(r"\d+\.step")
MAX_UNFINISHED_JOBS = 1000  # a submit past this is answered "busy": a runaway client cannot fill memory
KEEP_FINISHED_JOBS = 200  # done / failed jobs kept for `status` (and in the journal) after compaction


class JobFailed(RuntimeError):
    pass


@dataclass
class Job:
    spec: JobSpec
    state: str = "queued"
    bytes_done: int = 0
    error: str | None = None
    files_done: set[str] = field(default_factory=set)
    resumed: bool = False  # replayed from the journal after a restart (or retried): clean up first
    attempts: int = 0
    retry_until: float | None = None  # unix time: an outage began; the job fails if it lasts past this
    next_attempt_at: float | None = None

    def status(self) -> dict:
        return {
            "job_id": self.spec.job_id,
            "state": self.state,
            "bytes_done": min(self.bytes_done, self.spec.bytes_total),
            "bytes_total": self.spec.bytes_total,
            "error": self.error,
            "dst": self.spec.dst,
            "marker": self.spec.marker,
            "attempts": self.attempts,
            "retry_until": self.retry_until,
            "next_attempt_at": self.next_attempt_at,
        }


@dataclass(frozen=True)
class TransferOptions:
    workers: int = 4  # files in flight per job; S3 parts in flight: 2 x workers
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    checksum_algorithm: str = "CRC32"  # S3 per-part checksum, read back after the upload
    part_delay_s: float = 0.0  # tests only: slows every part down
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # botocore's, for every S3 call
    outage_deadline_s: float = 24 * 3600.0  # how long a job outlives an outage before it fails
    outage_pause_s: tuple[float, float] = (2.0, 60.0)  # first and longest pause between job attempts


class JobRunner:
    def __init__(
        self, spool: Spool, journal: Journal, options: TransferOptions, allowed: AllowedDestinations
    ) -> None:
        self.spool, self.journal, self.options, self.allowed = spool, journal, options, allowed
        self.jobs: dict[str, Job] = {}
        self._held: list = []  # journal records of jobs outside --allow-dst: kept, never run
        self._records_since_compaction = 0
        self.compact_every = KEEP_FINISHED_JOBS // 2  # finished jobs between two compactions
        self._journal_lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)

    def start(self) -> None:
        """Replays the journal: unfinished jobs go back in the queue, in their order."""
        for job_id, record in self.journal.replay().items():
            if record.state != "done" and not self._allowed_on_replay(record.spec):
                self._held.append(record)
                continue
            job = Job(
                record.spec,
                state=record.state,
                error=record.error,
                files_done=set(record.files_done),
                resumed=True,
            )
            self.jobs[job_id] = job
            if job.state == "queued":
                log.info(
                    "resuming job %s from the journal (%d file(s) already uploaded)",
                    job_id,
                    len(job.files_done),
                )
                self._queue.put(job)
            elif job.state == "done":
                self._remove_spool_copy(job)  # a crash may have come between "done" and the delete
        self._thread.start()

    def _allowed_on_replay(self, spec: JobSpec) -> bool:
        """A journaled job outside this uploader's destinations (a planted record, or another run's
        job on a shared spool) is not run and not marked failed: its records stay in the journal for
        an uploader that is allowed there."""
        try:
            self.allowed.check(spec.dst)
        except (ProtocolError, StorageURIError) as error:
            log.warning("journal job %s not resumed: %s", spec.job_id, error)
            return False
        return True

    # ---- called from the server thread --------------------------------------------------------
    def submit(self, spec: JobSpec) -> None:
        """Journals and queues the job; returns once the journal record is durable. The same
        job again is accepted without effect, unless it failed: then it is tried again. A job whose
        destination is not allowed is refused before anything is created, deleted or journaled."""
        self.allowed.check(spec.dst)  # DestinationRefused / StorageURIError: an error reply
        with self._lock:
            existing = self.jobs.get(spec.job_id)
            if existing is not None and existing.spec != spec:
                raise ProtocolError(
                    f"job_id {spec.job_id!r} was already submitted with a different src/dst/files/marker"
                )
            if existing is not None and existing.state != "failed":
                return
            unfinished = sum(job.state not in ("done", "failed") for job in self.jobs.values())
            if unfinished >= MAX_UNFINISHED_JOBS:
                raise ProtocolError(
                    f"busy: {unfinished} jobs are not finished (limit {MAX_UNFINISHED_JOBS}); try again later"
                )
        self.spool.check_job(spec)
        job = Job(spec)
        with self._journal_lock:  # a compaction sees the job in both or in neither
            self.journal.append({"event": "submit", "job": spec.to_dict()})
            with self._lock:
                self.jobs[spec.job_id] = job
        self._queue.put(job)

    def status(self, job_id: str | None = None) -> dict | list[dict]:
        with self._lock:
            if job_id is None:
                return [job.status() for job in self.jobs.values()]
            job = self.jobs.get(job_id)
        if job is None:
            raise ProtocolError(f"unknown job_id {job_id!r}")
        return job.status()

    # ---- the job thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            while not self._attempt(job):
                self._pause(job)

    def _attempt(self, job: Job) -> bool:
        """One try of the job; False when it met an outage and is to be tried again."""
        job.state, job.bytes_done, job.next_attempt_at = "uploading", 0, None
        job.attempts += 1
        try:
            self._run(job)
        except TransientStoreError as error:
            now = time.time()
            if job.retry_until is None:
                job.retry_until = now + self.options.outage_deadline_s
            if now >= job.retry_until:
                self._fail(job, f"gave up after an outage of {self.options.outage_deadline_s:.0f} s: {error}")
                return True
            job.state, job.error = "retrying", str(error)
            job.resumed = True  # the next try aborts this one's multipart uploads, keeps its files
            return False
        except (JobFailed, StoreError, StorageURIError, ProtocolError, OSError) as error:
            self._fail(job, str(error))
        except Exception as error:  # a bug: the job fails, the service stays up
            log.exception("job %s: unexpected error", job.spec.job_id)
            self._fail(job, f"internal error: {type(error).__name__}: {error}")
        return True

    def _pause(self, job: Job) -> None:
        first, longest = self.options.outage_pause_s
        pause = min(longest, first * 2 ** min(job.attempts - 1, 16))
        pause = max(0.0, min(pause, job.retry_until - time.time()))
        job.next_attempt_at = time.time() + pause
        log.warning(
            "job %s: store unavailable (%s); attempt %d failed, next in %.1f s, giving up at %s",
            job.spec.job_id,
            job.error,
            job.attempts,
            pause,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.retry_until)),
        )
        time.sleep(pause)

    def _fail(self, job: Job, error: str) -> None:
        log.error("job %s failed: %s", job.spec.job_id, error)
        try:
            self.journal.append({"event": "failed", "job_id": job.spec.job_id, "error": error})
        except OSError as journal_error:  # the job thread must survive a full disk
            log.error("job %s: could not journal the failure: %s", job.spec.job_id, journal_error)
        job.error, job.state, job.next_attempt_at = error, "failed", None
        self._after_finish()

    def _after_finish(self) -> None:
        """Forgets the oldest finished jobs past KEEP_FINISHED_JOBS and, every so often, rewrites
        the journal with only what a restart needs, so neither grows for the life of the service."""
        self._records_since_compaction += 1
        with self._lock:
            finished = [job_id for job_id, job in self.jobs.items() if job.state in ("done", "failed")]
            for job_id in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
                del self.jobs[job_id]
        if self._records_since_compaction < self.compact_every:
            return
        with self._journal_lock:  # no submit or file_done record lands between snapshot and rewrite
            with self._lock:
                records = [record for held in self._held for record in _records_of(held.spec, held)]
                for job in self.jobs.values():
                    records.extend(_records_of(job.spec, job))
            try:
                self.journal.rewrite(records)
                self._records_since_compaction = 0
            except OSError as error:  # the old journal is intact: only the compaction is lost
                log.warning("could not compact the journal %s: %s", self.journal.path, error)

    def _run(self, job: Job) -> None:
        spec = job.spec
        self.allowed.check(spec.dst)  # checked at submit and replay; again right before writing
        folder = self._check_spool_files(spec)
        store = open_store(
            spec.dst,
            concurrency=2 * self.options.workers,  # parts in flight, shared by the files in flight
            part_size_bytes=self.options.part_size_bytes,
            part_delay_s=self.options.part_delay_s,
            checksum_algorithm=self.options.checksum_algorithm,
            retry=self.options.retry,
        )
        try:
            store.check_access()
            if job.resumed and (aborted := store.abort_incomplete_uploads(f.name for f in spec.files)):
                log.info(
                    "job %s: aborted %d multipart upload(s) left by the previous uploader",
                    spec.job_id,
                    aborted,
                )
            # NOTE: a destination folder reused for a new step (snapshot/0, snapshot/1) still holds
            # the old step's marker (`<step>.step`); it must go before any file is overwritten.
            # Other `*.step` files are left alone: on a multi-node save each node's job writes its
            # own part marker into the same folder, and another node's must survive this job.
            for key in store.list_keys():
                if "/" not in key and _STEP_MARKER.fullmatch(key):
                    log.info("job %s: removing stale marker %s from %s", spec.job_id, key, store.describe())
                    store.delete(key)
            self._upload_files(job, folder, store)
            self._verify(job, store)
            store.put_bytes(spec.marker, json.dumps(spec.to_dict(), indent=1).encode("utf-8"))
        finally:
            store.close()
        self.journal.append({"event": "done", "job_id": spec.job_id})
        job.state, job.error, job.retry_until = "done", None, None
        self._after_finish()
        log.info(
            "job %s done: %d file(s), %d bytes -> %s",
            spec.job_id,
            len(spec.files),
            spec.bytes_total,
            spec.dst,
        )
        self._remove_spool_copy(job)

    def _check_spool_files(self, spec: JobSpec) -> Path:
        """Before sending anything: every file is inside the spool and has the manifest's size."""
        self.spool.check_job(spec)
        folder = self.spool.job_folder(spec.src)
        if not folder.is_dir():
            raise JobFailed(f"spool folder {folder} does not exist")
        for entry in spec.files:
            path = folder / entry.name
            if not path.is_file():
                raise JobFailed(f"{path}: file is missing from the spool")
            size = path.stat().st_size
            if size != entry.size:
                raise JobFailed(f"{path}: {size} bytes in the spool, the manifest says {entry.size}")
        return folder

    def _upload_files(self, job: Job, folder: Path, store: Store) -> None:
        progress_lock = threading.Lock()

        def progress(count: int) -> None:
            with progress_lock:
                job.bytes_done += count

        def upload(entry) -> None:
            if entry.name in job.files_done and store.size(entry.name) == entry.size:
                progress(entry.size)  # finished before a restart
                return
            store.put_file(
                folder / entry.name,
                entry.name,
                expected_size=entry.size,
                expected_sha256=entry.sha256,
                on_progress=progress,
            )
            with self._journal_lock:
                self.journal.append({"event": "file_done", "job_id": job.spec.job_id, "name": entry.name})
                job.files_done.add(entry.name)

        # Largest files first: they hold the most parts, the small ones fill in around them.
        entries = sorted(job.spec.files, key=lambda e: -e.size)
        with ThreadPoolExecutor(
            max_workers=max(1, min(self.options.workers, len(entries))), thread_name_prefix="file"
        ) as pool:
            futures = [pool.submit(upload, entry) for entry in entries]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _verify(self, job: Job, store: Store) -> None:
        """The last look before the marker: every file is there with its full size."""
        for entry in job.spec.files:
            stored = store.size(entry.name)
            if stored != entry.size:
                raise JobFailed(
                    f"{store.describe()}: {entry.name} has {stored} bytes after the upload, "
                    f"expected {entry.size}"
                )

    def _remove_spool_copy(self, job: Job) -> None:
        try:
            folder = self.spool.job_folder(job.spec.src)
        except ProtocolError:
            return
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _records_of(spec: JobSpec, job) -> list[dict]:
    """The journal records that restore `job` (a Job or a replayed JournaledJob) on replay."""
    records: list[dict] = [{"event": "submit", "job": spec.to_dict()}]
    if job.state == "done":
        records.append({"event": "done", "job_id": spec.job_id})
    elif job.state == "failed":
        records.append({"event": "failed", "job_id": spec.job_id, "error": job.error or ""})
    else:
        records.extend(
            {"event": "file_done", "job_id": spec.job_id, "name": name} for name in sorted(job.files_done)
        )
    return records
