"""Saving a checkpoint from every rank, to one of three destinations:

- a local folder: ranks write straight into `<folder>/<step>/`, rank 0 adds the manifest, then
  the marker;
- an object store, synchronously: ranks write into a local staging folder and upload their own
  files, rank 0 uploads the manifest, then the marker;
- an object store or folder through the uploader (async_upload): ranks write into the spool
  (/dev/shm by default), rank 0 writes the manifest there and submits one job; training resumes
  as soon as the files are in memory. The uploader writes the marker after verifying the upload.

In every case the marker is the last thing written, so a reader never trusts a partial folder.
A rank on another host than rank 0 cannot reach rank 0's spool: it uploads its own files
synchronously and the job carries the rest.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import layout, world
from .capture import RunState, estimate_rank_bytes, layout_of, write_rank_files
from .locations import Location
from .manifest import FileEntry, Manifest, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    target: str
    step: int
    stall_seconds: float  # how long training waited for this save on this rank
    bytes_written: int  # this rank's files
    mode: str  # local | store | async | store (spool full)


def invalidate(target: Location) -> None:
    """Before a folder is (re)written: its old markers and manifest go first, so the folder reads
    as incomplete from now until the new marker."""
    for name in target.files():
        if layout.marker_step(name) is not None or name == layout.MANIFEST:
            target.delete(name)


def _manifest(run: RunState, step: int, entries: list[FileEntry]) -> Manifest:
    return Manifest(step, tuple(entries), layout_of(run.parallel, run.config), time.time())


class CheckpointSaver:
    def __init__(self, staging_root: Path | None = None, uploader=None, spool: Path | None = None,
                 spool_quota_bytes: int | None = None) -> None:
        self.staging_root = staging_root
        self.uploader = uploader  # a ckpt_uploader client when saving asynchronously
        self.spool = spool
        self.spool_quota_bytes = spool_quota_bytes
        self.pending: list[str] = []  # submitted upload jobs not yet known to be done (rank 0)
        self._on_spool_host = True
        self._hosts_checked = False
        self._job_names: dict[int, str] = {}
        self._job_targets: dict[str, str] = {}  # pending job -> the folder it writes
        self._handoff: threading.Thread | None = None  # checksums, manifest and submit of the last save
        self._handoff_error: BaseException | None = None

    def close(self, wait: bool = True, timeout_s: float = 3600.0) -> None:
        """Waits for the uploads still running (rank 0): the end of a run is not the end of its
        last checkpoint."""
        self.join_handoff()
        if self.uploader is None or not wait:
            return
        for job_id in list(self.pending):
            self._wait_job(job_id, timeout_s)

    def wait_all_uploads(self, timeout_s: float = 3600.0) -> None:
        """Waits for every job the uploader knows (rank 0), also those of an earlier trainer that a
        restarted uploader resumed from its journal: they may hold the newest checkpoint."""
        self.join_handoff()
        if self.uploader is None:
            return
        for job in self.uploader.status().get("jobs", []):
            if job.get("state") not in ("done", "failed"):
                state = self.uploader.wait(job["job_id"], timeout_s)
                if state.get("state") != "done":
                    log.warning("upload %s of an earlier run ended %s: %s", job["job_id"], state.get("state"), state.get("error"))
        self.pending.clear()

    # -- the save ------------------------------------------------------------------------------

    def save(self, run: RunState, target: Location, step: int) -> SaveResult:
        started = time.perf_counter()
        rank0 = run.parallel.rank == 0
        self.join_handoff()  # the previous save's hand-off (long done, normally)
        asynchronous = self.uploader is not None or (self.spool is not None and not rank0)
        if asynchronous and not self._hosts_checked:
            self._on_spool_host = world.same_host_as_rank_zero()
            self._hosts_checked = True
        room = True
        if asynchronous:
            need = sum(world.gather_to_all(estimate_rank_bytes(run) if self._on_spool_host else 0))
        if rank0:
            # A snapshot slot is rewritten every other snapshot: its previous upload must be over
            # before the old marker goes, or the two would interleave in the same folder.
            for job_id in [j for j in self.pending if self._job_targets.get(j) == target.uri]:
                self._wait_job(job_id, 3600.0)
            invalidate(target)
            if asynchronous:
                room = self._make_room(need)
        if asynchronous:
            room = world.broadcast_from_zero(room)
        world.barrier()  # no rank writes before the old marker is gone
        if target.local_path is not None and not asynchronous:
            mode, entries = "local", write_rank_files(target.local_path, run)
        elif asynchronous and room:
            mode, entries = self._write_async(run, target, step)
        else:
            mode, entries = "store (spool full)" if asynchronous else "store", self._write_and_upload(run, target)
        everyone = world.gather_to_all((mode, [e.__dict__ for e in entries]))
        if rank0:
            all_entries = [FileEntry(**e) for _, part in everyone for e in part]
            manifest = _manifest(run, step, all_entries)
            if mode == "async":
                self._handoff = threading.Thread(
                    target=self._run_handoff, args=(target, step, manifest), name=f"ckpt-handoff-{step}", daemon=True
                )
                self._handoff.start()
            else:
                target.write_bytes(layout.MANIFEST, manifest.to_bytes())
                target.write_bytes(layout.marker_name(step), b"")
        stall = time.perf_counter() - started
        return SaveResult(target.uri, step, stall, sum(e.size for e in entries), mode)

    def _write_and_upload(self, run: RunState, target: Location) -> list[FileEntry]:
        staging = Path(tempfile.mkdtemp(prefix="ckpt-stage-", dir=self._staging_root()))
        try:
            entries = write_rank_files(staging, run)
            for entry in entries:
                target.put_file(staging / entry.name, entry.name)
            return entries
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _staging_root(self) -> str | None:
        if self.staging_root is not None:
            self.staging_root.mkdir(parents=True, exist_ok=True)
            return str(self.staging_root)
        return None

    # -- async ---------------------------------------------------------------------------------

    def _job_folder(self, step: int) -> str:
        return self._job_names.setdefault(step, f"step{step}-{uuid.uuid4().hex[:8]}")

    def _write_async(self, run: RunState, target: Location, step: int) -> tuple[str, list[FileEntry]]:
        """Ranks on rank 0's host write into the spool (rank 0 checksums later, off the training
        path); ranks elsewhere upload their own files now. Every rank takes part in the two
        collectives, wherever it writes."""
        rank0 = run.parallel.rank == 0
        # NOTE: every rank must use the same job folder: rank 0 names it, the others learn it.
        name = world.broadcast_from_zero(self._job_folder(step) if rank0 else None)
        if not self._on_spool_host:
            entries = self._write_and_upload(run, target)
            world.any_rank(False)
            return "store", entries
        folder = self.spool / name
        failed = False
        try:
            entries = write_rank_files(folder, run, checksum=not rank0)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("spool %s is full (%s): this checkpoint is saved synchronously instead", self.spool, error)
            failed, entries = True, []
        if world.any_rank(failed):  # one rank out of room: all of them take the synchronous path
            shutil.rmtree(folder, ignore_errors=True)
            self._job_names.pop(step, None)
            return "store (spool full)", self._write_and_upload(run, target)
        return "async", entries

    def join_handoff(self) -> None:
        if self._handoff is not None:
            self._handoff.join()
            self._handoff = None
        if self._handoff_error is not None:
            error, self._handoff_error = self._handoff_error, None
            raise RuntimeError(f"handing the last checkpoint to the uploader failed: {error}") from error

    def _run_handoff(self, target: Location, step: int, manifest: Manifest) -> None:
        """Off the training path: checksums of the files rank 0's host wrote without them, the
        manifest, then the job to the uploader."""
        try:
            folder = self.spool / self._job_names[step]
            files = tuple(
                FileEntry(e.name, e.size, e.sha256 or sha256_of(folder / e.name)) for e in manifest.files
            )
            self._submit(target, step, Manifest(manifest.step, files, manifest.layout, manifest.created))
        except BaseException as error:  # noqa: BLE001 - reported at the next save or at close
            log.error("checkpoint %d: hand-off to the uploader failed: %s", step, error)
            self._handoff_error = error

    def _submit(self, target: Location, step: int, manifest: Manifest) -> None:
        name = self._job_names.pop(step)
        folder = self.spool / name
        data = manifest.to_bytes()
        (folder / layout.MANIFEST).write_bytes(data)
        in_spool = {p.name for p in folder.iterdir()}
        files = [
            {"name": e.name, "size": e.size, "sha256": e.sha256} for e in manifest.files if e.name in in_spool
        ]
        files.append({"name": layout.MANIFEST, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        job_id = name
        try:
            self.uploader.submit(job_id, name, target.uri, files, layout.marker_name(step))
        except Exception as error:  # noqa: BLE001 - any failure to hand off: the checkpoint must still land
            log.error(
                "checkpoint %d: the uploader did not take the job (%s); uploading it from this process instead",
                step, error,
            )
            self._upload_directly(folder, target, step, [f["name"] for f in files])
            return
        self.pending.append(job_id)
        self._job_targets[job_id] = target.uri
        size_mb = sum(f["size"] for f in files) / 1e6
        log.info("checkpoint %d handed to the uploader as job %s (%s MB)", step, job_id, f"{size_mb:,.1f}")

    def _upload_directly(self, folder: Path, target: Location, step: int, names: list[str]) -> None:
        """The uploader's job, done here (off the training path, in the hand-off thread): files,
        then the marker, then the spool copy goes."""
        for name in names:
            target.put_file(folder / name, name)
        target.write_bytes(layout.marker_name(step), b"")
        shutil.rmtree(folder, ignore_errors=True)
        log.info("checkpoint %d written to %s without the uploader", step, target.uri)

    def _make_room(self, need: int) -> bool:
        """Waits for the oldest uploads until the spool has room for this checkpoint (`need`
        bytes, estimated from the state sizes); the common case (room for two) waits for nothing.
        False when even an empty spool is too small: the caller then saves synchronously."""
        self._forget_finished()
        while self.pending and self._free_bytes() < need:
            job_id = self.pending[0]
            log.info("spool %s needs room for the next checkpoint: waiting for upload %s", self.spool, job_id)
            self._wait_job(job_id, 3600.0)
        free = self._free_bytes()
        if free < need:
            log.warning(
                "spool %s has room for %s MB, the checkpoint needs about %s MB: it is saved synchronously "
                "instead (raise uploader.spool_quota_gb or free the spool)", self.spool,
                f"{max(free, 0) / 1e6:,.1f}", f"{need / 1e6:,.1f}",
            )
            return False
        return True

    def _free_bytes(self) -> int:
        self.spool.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.spool).free
        if self.spool_quota_bytes is not None:
            used = sum(p.stat().st_size for p in self.spool.rglob("*") if p.is_file())
            free = min(free, self.spool_quota_bytes - used)
        return free

    def _forget_finished(self) -> None:
        still = []
        for job_id in self.pending:
            state = self.uploader.status(job_id)
            if state.get("state") == "failed":
                raise RuntimeError(f"upload {job_id} failed: {state.get('error')}")
            if state.get("state") != "done":
                still.append(job_id)
        self.pending = still

    def _wait_job(self, job_id: str, timeout_s: float) -> None:
        state = self.uploader.wait(job_id, timeout_s)
        if state.get("state") == "failed":
            raise RuntimeError(f"upload {job_id} failed: {state.get('error')}")
        if state.get("state") != "done":
            raise TimeoutError(f"upload {job_id} not finished after {timeout_s:.0f} s: {state}")
        if job_id in self.pending:
            self.pending.remove(job_id)
