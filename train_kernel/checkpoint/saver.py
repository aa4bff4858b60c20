"""Saving a checkpoint from every rank, to one of three destinations:

- a local folder: ranks write straight into `<folder>/<step>/`, rank 0 adds the manifest, then
  the marker;
- an object store, synchronously: ranks write into a local staging folder and upload their own
  files, rank 0 uploads the manifest, then the marker;
- an object store or folder through the uploader (async_upload): ranks write into their node's
  spool (/dev/shm by default) and training resumes at once; a background thread of each node's
  first rank checksums the node's files and submits its job. Other nodes' jobs end with a part
  marker listing their files; rank 0's waits for those, then carries the manifest, and the
  uploader writes the step marker after verifying the upload.

In every case the marker is the last thing written, so a reader never trusts a partial folder.

An upload never stops training: a failed job is reported (its checkpoint has no marker, so no
reader takes it) and the run goes on; while the store is out (the uploader reports the job as
"retrying"), a save that would have to wait for that upload (a snapshot slot still being uploaded,
a full spool) is skipped with an error in the log instead, and the uploader keeps the earlier ones
in its spool until the store is back. Every such decision is rank 0's, broadcast to all ranks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ckpt_uploader.stores import StoreError

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
    mode: str  # local | store | async | store (spool full) | skipped


def invalidate(target: Location) -> None:
    """Before a folder is (re)written: its old markers and manifest go first, so the folder reads
    as incomplete from now until the new marker."""
    for name in target.files():
        if name.endswith(".step") or name == layout.MANIFEST:  # step and part markers, the manifest
            target.delete(name)


def _manifest(run: RunState, step: int, entries: list[FileEntry]) -> Manifest:
    return Manifest(step, tuple(entries), layout_of(run.parallel, run.config), time.time())


class CheckpointSaver:
    def __init__(
        self,
        staging_root: Path | None = None,
        uploader=None,
        spool: Path | None = None,
        spool_quota_bytes: int | None = None,
        node: int = 0,
        nodes: int = 1,
    ) -> None:
        self.staging_root = staging_root
        self.uploader = uploader  # a ckpt_uploader client: on the first rank of each node, async only
        self.spool = spool  # this node's spool (every rank, async only)
        self.spool_quota_bytes = spool_quota_bytes
        self.node, self.nodes = node, nodes  # this rank's node among the job's nodes
        self.pending: list[str] = []  # submitted upload jobs not yet known to be done (node leaders)
        self._job_names: dict[int, str] = {}
        self._job_targets: dict[str, str] = {}  # pending job -> the folder it writes
        self._handoff: threading.Thread | None = None  # checksums, manifest and submit of the last save
        self._handoff_error: BaseException | None = None

    def close(self, wait: bool = True, timeout_s: float = 3600.0) -> list[dict]:
        """Waits up to `timeout_s` for this node's uploads still running (its first rank): the end
        of a run is not the end of its last checkpoint. Returns the status of the jobs still
        unfinished then (they stay in the uploader's journal)."""
        self.join_handoff()
        if self.uploader is None or not wait:
            return []
        deadline = time.monotonic() + timeout_s
        for job_id in list(self.pending):
            self._wait_job(job_id, max(0.0, deadline - time.monotonic()), through_outage=True)
        left = []
        for job_id in self.pending:
            try:
                left.append(self.uploader.status(job_id))
            except Exception as error:  # noqa: BLE001 - the report must not fail the exit
                left.append({"job_id": job_id, "state": "unknown", "error": str(error)})
        return left

    def wait_all_uploads(self, timeout_s: float = 3600.0) -> None:
        """Waits for every job this node's uploader knows, also those of an earlier trainer that a
        restarted uploader resumed from its journal: they may hold the newest checkpoint."""
        self.join_handoff()
        if self.uploader is None:
            return
        for job in self.uploader.status().get("jobs", []):
            if job.get("state") not in ("done", "failed"):
                if self._wait_job(job["job_id"], timeout_s) != "done":
                    log.warning(
                        "upload %s to %s is not done (%s); resuming without it",
                        job["job_id"],
                        job.get("dst"),
                        self._state(job["job_id"]).get("state"),
                    )
        self.pending.clear()

    # -- the save ------------------------------------------------------------------------------

    def save(self, run: RunState, target: Location, step: int) -> SaveResult:
        started = time.perf_counter()
        rank0 = run.parallel.rank == 0
        self.join_handoff()  # the previous save's hand-off (long done, normally)
        asynchronous = self.spool is not None
        plan = "write"
        if asynchronous:  # the room rank 0's node needs; the other nodes are alike
            need = sum(world.gather_to_all(estimate_rank_bytes(run) if self.node == 0 else 0))
            plan = self._plan_async(target, step, need) if rank0 else None
        if rank0 and plan != "skip":
            plan = self._invalidate(target, step, plan)
        # Every rank follows rank 0's plan, which also orders the old marker's removal before any
        # rank writes.
        plan = world.broadcast_from_zero(plan)
        if plan == "skip":
            return SaveResult(target.uri, step, time.perf_counter() - started, 0, "skipped")
        if target.local_path is not None and not asynchronous:
            mode, entries = "local", write_rank_files(target.local_path, run)
        elif plan == "async":
            mode, entries = self._write_async(run, target, step)
        else:
            mode = "store (spool full)" if asynchronous else "store"
            entries = self._write_to_store(run, target, step)
            if entries is None:
                return SaveResult(target.uri, step, time.perf_counter() - started, 0, "skipped")
        everyone = world.gather_to_all((mode, self.node, [e.__dict__ for e in entries]))
        if mode == "async" and self.uploader is not None:  # the first rank of each node
            mine = [FileEntry(**e) for _, node, part in everyone if node == self.node for e in part]
            template = _manifest(run, step, [])
            self._handoff = threading.Thread(
                target=self._run_handoff,
                args=(target, step, mine, template),
                name=f"ckpt-handoff-{step}",
                daemon=True,
            )
            self._handoff.start()
        elif rank0 and mode != "async":
            manifest = _manifest(run, step, [FileEntry(**e) for _, _, part in everyone for e in part])
            target.write_bytes(layout.MANIFEST, manifest.to_bytes())
            target.write_bytes(layout.marker_name(step), b"")
        stall = time.perf_counter() - started
        return SaveResult(target.uri, step, stall, sum(e.size for e in entries), mode)

    @staticmethod
    def _invalidate(target: Location, step: int, plan: str) -> str:
        """Rank 0 removes the target's old markers. When the store cannot be reached, an async
        save goes on (the uploader removes stale markers itself before its first file); a save
        straight to the store is skipped (it could not be written either)."""
        try:
            invalidate(target)
        except (StoreError, OSError) as error:
            if plan == "async":
                log.warning(
                    "checkpoint %d: could not clear %s yet (%s); the uploader will", step, target.uri, error
                )
                return plan
            log.error(
                "checkpoint %d skipped: %s cannot be written now (%s); training goes on",
                step,
                target.uri,
                error,
            )
            return "skip"
        return plan

    def _write_to_store(self, run: RunState, target: Location, step: int) -> list[FileEntry] | None:
        """Every rank uploads its own files; None (on every rank) when one of them could not, so
        the checkpoint gets no marker and training goes on."""
        try:
            entries, failed = self._write_and_upload(run, target), False
        except (StoreError, OSError) as error:
            log.error("checkpoint %d: writing to %s failed (%s)", step, target.uri, error)
            entries, failed = [], True
        if world.any_rank(failed):
            if run.parallel.rank == 0:
                log.error("checkpoint %d skipped: not every rank could write it; training goes on", step)
            return None
        return entries

    def _plan_async(self, target: Location, step: int, need: int) -> str:
        """Rank 0: "async" (into the spool), "sync" (straight to the store: the spool is too small)
        or "skip" (an upload this save must wait for is held up by a store outage)."""
        # A snapshot slot is rewritten every other snapshot: its previous upload must be over
        # before the old marker goes, or the two would interleave in the same folder.
        for job_id in [j for j in self.pending if self._job_targets.get(j) == target.uri]:
            if self._wait_job(job_id, 3600.0) not in ("done", "failed"):
                log.error(
                    "checkpoint %d skipped: the previous upload to %s (job %s) is held up by a store "
                    "outage; training goes on and the next save tries again",
                    step,
                    target.uri,
                    job_id,
                )
                return "skip"
        room = self._make_room(need)
        if room:
            return "async"
        if self._store_out():
            log.error(
                "checkpoint %d skipped: the spool is full of uploads held up by a store outage, and "
                "the store would not take it directly either; the next save tries again",
                step,
            )
            return "skip"
        return "sync"

    def _store_out(self) -> bool:
        """True while one of this node's uploads is being retried through a store outage."""
        return any(self._state(job_id).get("state") == "retrying" for job_id in self.pending)

    def _state(self, job_id: str) -> dict:
        try:
            return self.uploader.status(job_id)
        except Exception as error:  # noqa: BLE001 - an unreachable uploader: treat the job as unknown
            log.warning("upload %s: no status from the uploader (%s)", job_id, error)
            return {"job_id": job_id, "state": "unknown", "error": str(error)}

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

    def _job_folder_on_node(self, base: str) -> str:
        return base if self.nodes == 1 else f"{base}-n{self.node}"

    def _write_async(self, run: RunState, target: Location, step: int) -> tuple[str, list[FileEntry]]:
        """Every rank serialises into its node's spool, without checksums (the node's first rank
        takes them later, off the training path). Every rank takes part in both collectives."""
        rank0 = run.parallel.rank == 0
        # NOTE: every rank must use the same job name: rank 0 chooses it, the others learn it.
        base = world.broadcast_from_zero(self._job_folder(step) if rank0 else None)
        self._job_names[step] = self._job_folder_on_node(base)
        folder = self.spool / self._job_names[step]
        failed = False
        try:
            entries = write_rank_files(folder, run, checksum=False)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning(
                "spool %s is full (%s): this checkpoint is saved synchronously instead", self.spool, error
            )
            failed, entries = True, []
        if world.any_rank(failed):  # one rank out of room: all of them take the synchronous path
            shutil.rmtree(folder, ignore_errors=True)
            self._job_names.pop(step, None)
            return "store (spool full)", self._write_and_upload(run, target)
        return "async", entries

    def join_handoff(self) -> None:
        """Waits for the last save's hand-off. Its failure was logged where it happened; it is not
        raised here: this runs on one rank only, and the others would wait in the next collective
        until it timed out. That checkpoint has no marker, so no reader takes it."""
        if self._handoff is not None:
            self._handoff.join()
            self._handoff = None
        self._handoff_error = None

    def _run_handoff(self, target: Location, step: int, mine: list[FileEntry], template: Manifest) -> None:
        """Off the training path, on the first rank of each node: the checksums of the node's files,
        then its job. Other nodes' jobs end with a part marker listing their files; rank 0's node
        waits for those, writes the manifest of every file and submits the job whose marker makes
        the checkpoint complete."""
        try:
            folder = self.spool / self._job_names[step]
            files = [FileEntry(e.name, e.size, e.sha256 or sha256_of(folder / e.name)) for e in mine]
            if self.node != 0:
                self._submit(target, step, files, None)
                return
            for node in range(1, self.nodes):
                files += self._node_files(target, step, node)
            self._submit(target, step, files, Manifest(step, tuple(files), template.layout, template.created))
        except BaseException as error:  # noqa: BLE001 - reported at the next save or at close
            log.error("checkpoint %d: hand-off to the uploader failed: %s", step, error)
            self._handoff_error = error

    @staticmethod
    def _node_files(target: Location, step: int, node: int, timeout_s: float = 3600.0) -> list[FileEntry]:
        """The files another node uploaded, from its part marker (the uploader writes the job spec
        there after verifying every file)."""
        marker = layout.part_marker_name(node, step)
        deadline = time.monotonic() + timeout_s
        while not target.exists(marker):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node {node} did not finish uploading its part of checkpoint {step} to {target.uri}"
                )
            time.sleep(0.2)
        spec = json.loads(target.read_bytes(marker))
        return [FileEntry(f["name"], int(f["size"]), f["sha256"]) for f in spec["files"]]

    def _submit(self, target: Location, step: int, files: list[FileEntry], manifest: Manifest | None) -> None:
        name = self._job_names.pop(step)
        folder = self.spool / name
        in_spool = {p.name for p in folder.iterdir()}
        jobs = [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in files if e.name in in_spool]
        marker = layout.part_marker_name(self.node, step)
        if manifest is not None:
            data = manifest.to_bytes()
            (folder / layout.MANIFEST).write_bytes(data)
            jobs.append(
                {"name": layout.MANIFEST, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            marker = layout.marker_name(step)
        job_id = name
        try:
            self.uploader.submit(job_id, name, target.uri, jobs, marker)
        except Exception as error:  # noqa: BLE001 - any failure to hand off: the checkpoint must still land
            log.error(
                "checkpoint %d: the uploader did not take the job (%s); "
                "uploading it from this process instead",
                step,
                error,
            )
            self._upload_directly(folder, target, marker, jobs)
            return
        self.pending.append(job_id)
        self._job_targets[job_id] = target.uri
        size_mb = sum(f["size"] for f in jobs) / 1e6
        log.info("checkpoint %d handed to the uploader as job %s (%s MB)", step, job_id, f"{size_mb:,.1f}")

    def _upload_directly(self, folder: Path, target: Location, marker: str, jobs: list[dict]) -> None:
        """The uploader's job, done here (off the training path, in the hand-off thread): files,
        then the marker (listing them, as the uploader's does), then the spool copy goes."""
        for job in jobs:
            target.put_file(folder / job["name"], job["name"])
        target.write_bytes(marker, json.dumps({"files": jobs}).encode())
        shutil.rmtree(folder, ignore_errors=True)
        log.info("%s written to %s without the uploader", marker, target.uri)

    def _make_room(self, need: int) -> bool:
        """Waits for the oldest uploads until the spool has room for this checkpoint (`need`
        bytes, estimated from the state sizes); the common case (room for two) waits for nothing.
        False when even an empty spool is too small, or when the upload it waits for is held up
        by a store outage."""
        self._forget_finished()
        while self.pending and self._free_bytes() < need:
            job_id = self.pending[0]
            log.info("spool %s needs room for the next checkpoint: waiting for upload %s", self.spool, job_id)
            if self._wait_job(job_id, 3600.0) not in ("done", "failed"):
                return False
        free = self._free_bytes()
        if free < need:
            log.warning(
                "spool %s has room for %s MB, the checkpoint needs about %s MB: it is saved synchronously "
                "instead (raise uploader.spool_quota_gb or free the spool)",
                self.spool,
                f"{max(free, 0) / 1e6:,.1f}",
                f"{need / 1e6:,.1f}",
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
            state = self._state(job_id)
            if state.get("state") == "failed":
                self._report_failed(state)
            elif state.get("state") != "done":
                still.append(job_id)
        self.pending = still

    def _report_failed(self, state: dict) -> None:
        log.error(
            "upload %s to %s FAILED: %s. That checkpoint is incomplete (no marker): resuming never "
            "takes it. Its files stay in the spool; training goes on.",
            state.get("job_id"),
            state.get("dst"),
            state.get("error"),
        )

    def _wait_job(self, job_id: str, timeout_s: float, through_outage: bool = False) -> str:
        """Waits until the job is done or failed (a failure is reported, never raised: this runs on
        rank 0 alone), at most `timeout_s`; unless `through_outage`, it stops waiting as soon as
        the uploader reports the job retrying through a store outage. Returns the last state:
        done, failed, retrying, or the state it was in when the time ran out."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # Short slices: an outage that starts during the wait is seen within seconds.
                state = self.uploader.wait(job_id, min(5.0, max(0.0, deadline - time.monotonic())))
            except Exception as error:  # noqa: BLE001 - a dead uploader must not stop training here
                log.error("upload %s: the uploader did not answer (%s)", job_id, error)
                return "unknown"
            name = state.get("state")
            if name in ("done", "failed"):
                if name == "failed":
                    self._report_failed(state)
                if job_id in self.pending:
                    self.pending.remove(job_id)
                return name
            if (name == "retrying" and not through_outage) or time.monotonic() >= deadline:
                return name
