"""The trainer's checkpoint policy: when to save (checkpoint_every, snapshots, stop requests),
where (local / object store / the uploader), and what to resume from at start (auto_resume,
load_ckpt_folder, load_ckpt_info, load_model_only_folder), falling back past a damaged checkpoint."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from train_kernel.config.errors import ConfigError
from train_kernel.interop.fetch import local_folder
from train_kernel.interop.foreign import is_foreign, read_foreign_model
from train_kernel.model.state_files import CONFIG_FILE as MODEL_CONFIG_FILE
from train_kernel.model.state_files import is_model_file
from train_kernel.model.state_files import load_model_state as load_plain_model_state

from . import layout, world
from .capture import RunState
from .discovery import complete_checkpoints
from .locations import Location, open_location
from .manifest import CheckpointError
from .model_state import check_model_state, load_model_state
from .restore import apply_payload, expand_content, read_manifest, read_payload
from .saver import CheckpointSaver, SaveResult

log = logging.getLogger(__name__)

_READ_ERRORS = (CheckpointError, OSError, KeyError, ValueError, RuntimeError)
# InternLM's default async_upload_tmp_folder: one path for every user of a node.
SHARED_INTERNLM_SPOOL = Path("/dev/shm/internlm_tmp_ckpt")


def spool_folder(configured: str) -> Path:
    """The folder to stage checkpoints in. InternLM's shared default becomes a folder of this
    user's own (`/dev/shm/internlm_tmp_ckpt-<uid>`): on a shared path, whoever creates it first
    would own it, and every other user's run would be refused (or, were it not checked, could be
    fed planted jobs). Any other folder is taken as given and checked for ownership."""
    path = Path(configured)
    if path == SHARED_INTERNLM_SPOOL and hasattr(os, "getuid"):
        own = path.with_name(f"{path.name}-{os.getuid()}")
        log.info("ckpt.async_upload_tmp_folder %s is shared by every user: staging in %s instead", path, own)
        return own
    return path


def upload_destinations(ckpt) -> list[str]:
    """What a run's private uploader may write: its save folder and its snapshot folder, no more."""
    folders = (ckpt.save_ckpt_folder, ckpt.snapshot_ckpt_folder)
    return list(dict.fromkeys(folder for folder in folders if folder))


class CheckpointManager:
    def __init__(self, config, parallel) -> None:
        self.config = config
        self.parallel = parallel
        ckpt = config.ckpt
        self.enabled = bool(ckpt.enable_save_ckpt)
        self.every = ckpt.checkpoint_every  # the config fills both defaults (TrainConfig.derived_fields)
        snapshot_every = ckpt.oss_snapshot_freq
        self.snapshot_every = snapshot_every if snapshot_every and snapshot_every < self.every else 0
        from ckpt_uploader.stores import RetryPolicy

        uploader = config.uploader
        self.retry = RetryPolicy(uploader.retry_mode, uploader.retry_attempts)
        self.save_root: Location | None = (
            open_location(ckpt.save_ckpt_folder, self.retry) if ckpt.save_ckpt_folder else None
        )
        self.snapshot_root: Location | None = (
            open_location(ckpt.snapshot_ckpt_folder, self.retry) if ckpt.snapshot_ckpt_folder else None
        )
        self.private_uploader = None
        self.saver = self._make_saver()
        self.scratch = Path(tempfile.mkdtemp(prefix="ckpt-read-"))
        self.last_saved_step: int | None = None

    # -- set-up --------------------------------------------------------------------------------

    def _make_saver(self) -> CheckpointSaver:
        ckpt, uploader_cfg = self.config.ckpt, self.config.uploader
        if uploader_cfg.spool or uploader_cfg.address:
            # A standalone uploader serves the folder both were told: taken exactly as written.
            spool_dir = uploader_cfg.spool or ckpt.async_upload_tmp_folder
            staging = Path(spool_dir) if spool_dir else None
        else:
            staging = spool_folder(ckpt.async_upload_tmp_folder) if ckpt.async_upload_tmp_folder else None
        if not (self.enabled and ckpt.async_upload):
            return CheckpointSaver(staging_root=staging)
        spool = staging.resolve()
        self._spool = spool
        quota = int(uploader_cfg.spool_quota_gb * 1e9) if uploader_cfg.spool_quota_gb else None
        # Each node has its own spool (/dev/shm) and its own uploader, held by its first rank.
        hosts = world.gather_to_all(world.host_name())
        names = list(dict.fromkeys(hosts))
        host = hosts[self.parallel.rank]
        node, nodes = names.index(host), len(names)
        self._journal = spool / f".ckpt-uploader-journal-{host}.jsonl" if nodes > 1 else None
        client = self._connect_uploader(spool) if hosts.index(host) == self.parallel.rank else None
        return CheckpointSaver(
            staging_root=spool / ".staging",
            uploader=client,
            spool=spool,
            spool_quota_bytes=quota,
            node=node,
            nodes=nodes,
        )

    def _connect_uploader(self, spool: Path):
        address = self.config.uploader.address
        if address is None:
            from ckpt_uploader.embedded import start_private_uploader
            from ckpt_uploader.ownership import OwnershipError, private_folder

            try:
                private_folder(spool, "spool")  # 0700, or an error naming a foreign / shared one
            except OwnershipError as error:
                raise ConfigError(str(error), key="ckpt.async_upload_tmp_folder") from None
            self.private_uploader = start_private_uploader(
                spool,
                allow_dst=upload_destinations(self.config.ckpt),
                journal=self._journal,
                extra_args=self._uploader_args(),
            )
            address = self.private_uploader.address
            log.info("started a private checkpoint uploader at %s (spool %s)", address, spool)
        if "://" not in address:
            address = f"tcp://{address}"
        return self._connect(address)

    def _connect(self, address: str):
        from ckpt_uploader.client import UploaderClient, UploaderError
        from ckpt_uploader.curve import CurveError, load_key_pair, load_public_key

        settings = self.config.uploader
        server_key = None
        for key, load, value in (
            ("server_public_key", load_public_key, settings.server_public_key),
            ("client_secret_key_file", load_key_pair, settings.client_secret_key_file),
        ):
            try:
                loaded = load(value) if value else None
            except CurveError as error:
                raise ConfigError(str(error), key=f"uploader.{key}") from None
            if key == "server_public_key":
                server_key = loaded
        client = UploaderClient(
            address, curve_server_key=server_key, curve_client_key=settings.client_secret_key_file
        )
        try:
            client.ping()
        except UploaderError as error:
            if settings.server_public_key:
                hint = (
                    "; with CURVE, check uploader.server_public_key, and that the uploader's authorized/ "
                    "folder holds the public key of uploader.client_secret_key_file"
                )
            else:
                hint = (
                    ""
                    if self.private_uploader
                    else "; a CURVE-protected uploader needs uploader.server_public_key"
                )
            raise ConfigError(f"{error}{hint}", key="uploader.address") from None
        return client

    def _uploader_args(self) -> tuple[str, ...]:
        uploader = self.config.uploader
        return (
            "--retry-mode",
            uploader.retry_mode,
            "--retry-attempts",
            str(uploader.retry_attempts),
            "--outage-deadline",
            f"{uploader.outage_deadline_s}s",
        )

    def _revive_uploader(self) -> None:
        """A private uploader that died (OOM killer, a stray signal) is started again on the same
        spool and journal: it resumes every upload it had acknowledged."""
        if self.private_uploader is None or self.private_uploader.process.poll() is None:
            return
        from ckpt_uploader.client import UploaderClient
        from ckpt_uploader.embedded import start_private_uploader

        log.warning(
            "the private checkpoint uploader exited with %s: starting a new one on %s; it resumes the "
            "unfinished uploads from its journal",
            self.private_uploader.process.returncode,
            self._spool,
        )
        self.saver.join_handoff()
        self.saver.uploader.close()
        self.private_uploader = start_private_uploader(
            self._spool,
            allow_dst=upload_destinations(self.config.ckpt),
            journal=self._journal,
            extra_args=self._uploader_args(),
        )
        self.saver.uploader = UploaderClient(self.private_uploader.address)
        self.saver.uploader.ping()

    def check_storage(self) -> None:
        """Fails before the first step when the save folder cannot be written (unreachable store,
        missing bucket, bad credentials), as InternLM pings its storage at start."""
        error = None
        if self.parallel.rank == 0 and self.enabled and self.save_root is not None:
            try:
                self.save_root.check_access()
            except Exception as failure:  # noqa: BLE001 - any failure here stops the job with its message
                error = f"checkpoint folder {self.save_root.uri} is not usable: {failure}"
        error = world.broadcast_from_zero(error)
        if error:
            raise CheckpointError(error)

    # -- saving --------------------------------------------------------------------------------

    def due(self, step: int) -> str | None:
        """What to save after `step` steps: "checkpoint", "snapshot" or None."""
        if not self.enabled:
            return None
        if step % self.every == 0 or step == self.config.data.total_steps:
            return "checkpoint"
        if self.snapshot_every and step % self.snapshot_every == 0:
            return "snapshot"
        return None

    def snapshot_index(self, step: int) -> int:
        """How many snapshots were due up to `step`: multiples of oss_snapshot_freq, less those that
        fell on checkpoint steps (no snapshot there). Consecutive snapshots then take the two slots
        in turn, after a resume too (with freq 50 and checkpoints every 100, step // freq alone is
        odd at every snapshot and would always pick the same slot)."""
        both = math.lcm(self.snapshot_every, self.every)
        return step // self.snapshot_every - step // both

    def save(self, run: RunState, step: int, kind: str = "checkpoint") -> SaveResult | None:
        if not self.enabled or self.save_root is None or self.last_saved_step == step:
            return None
        if kind == "snapshot" and self.snapshot_root is not None:
            target = self.snapshot_root.child(layout.SNAPSHOT_SLOTS[self.snapshot_index(step) % 2])
        else:
            target = self.save_root.child(str(step))
        self._revive_uploader()
        result = self.saver.save(run, target, step)
        self.last_saved_step = step
        if self.parallel.rank == 0:
            log.info(
                "saved %s %d to %s (%s): training waited %.2f s",
                kind,
                step,
                target.uri,
                result.mode,
                result.stall_seconds,
            )
        return result

    def close(self) -> None:
        """Waits (at most uploader.exit_wait_s) for the uploads still in flight, then reports what
        is left and where it waits."""
        wait_s = self.config.uploader.exit_wait_s
        deadline = time.monotonic() + wait_s
        left: list[dict] = []
        try:
            if self.saver.pending:
                log.info(
                    "waiting up to %.0f s (uploader.exit_wait_s) for %d checkpoint upload(s): %s",
                    wait_s,
                    len(self.saver.pending),
                    ", ".join(self.saver.pending),
                )
            self._revive_uploader()
            left = self.saver.close(wait=True, timeout_s=wait_s)
            if left:
                self._report_unfinished(left, wait_s)
        finally:
            if self.private_uploader is not None:
                remaining = max(0.0, deadline - time.monotonic())
                self.private_uploader.stop(drain=not left, timeout_s=remaining)
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _report_unfinished(self, jobs: list[dict], wait_s: float) -> None:
        spool, journal = self._spool, self._journal or self._spool / ".ckpt-uploader-journal.jsonl"
        log.error("%d checkpoint upload(s) not finished after %.0f s:", len(jobs), wait_s)
        for job in jobs:
            done, total = job.get("bytes_done", 0), job.get("bytes_total", 0)
            log.error(
                "  %s -> %s: %s, %.1f of %.1f MB%s; its files wait in %s",
                job.get("job_id"),
                job.get("dst"),
                job.get("state"),
                done / 1e6,
                total / 1e6,
                f" ({job['error']})" if job.get("error") else "",
                spool / str(job.get("job_id")),
            )
        if self.config.uploader.address is None:
            log.error(
                "they are finished by the next uploader started on %s with journal %s: the next run "
                "of this job does that (or `ckpt-uploader serve --spool %s --journal %s --allow-dst "
                "<save folder>`); until then that checkpoint has no marker and no resume takes it",
                spool,
                journal,
                spool,
                journal,
            )
        else:
            log.error("the uploader at %s goes on with them", self.config.uploader.address)

    # -- resuming ------------------------------------------------------------------------------

    def _auto_candidates(self, at_most_step: int | None = None) -> list[str]:
        if not (self.config.ckpt.auto_resume or at_most_step is not None) or self.save_root is None:
            return []
        if self.parallel.rank == 0:
            self.saver.wait_all_uploads()  # an upload still in flight may be the newest checkpoint
            found = complete_checkpoints(self.save_root, self.snapshot_root)
            uris = [c.location.uri for c in found if at_most_step is None or c.step <= at_most_step]
        else:
            uris = None
        return world.broadcast_from_zero(uris)

    def reload_latest(self, run: RunState, at_most_step: int) -> str | None:
        """A rollback (train_kernel.health): the newest complete checkpoint at or before
        `at_most_step` loaded whole into `run`, whatever auto_resume says; None when there is none."""
        uris = self._auto_candidates(at_most_step)
        return self._load_first_good(run, uris, ("all",), strict=False) if uris else None

    def resume(self, run: RunState) -> str | None:
        """Loads the checkpoint the config asks for; returns its URI, or None for a fresh start."""
        auto = self._auto_candidates()
        if auto:
            return self._load_first_good(run, auto, ("all",), strict=False)
        info = self.config.ckpt.load_info
        if info is None:
            if self.config.ckpt.auto_resume and self.config.ckpt.save_ckpt_folder:
                log.info(
                    "auto_resume: no complete checkpoint in %s, starting from scratch",
                    self.config.ckpt.save_ckpt_folder,
                )
            return None
        return self._load_first_good(
            run, [info.path], tuple(info.content), strict=True, ckpt_type=info.ckpt_type
        )

    def _load_first_good(
        self,
        run: RunState,
        uris: list[str],
        content: tuple[str, ...],
        strict: bool,
        ckpt_type: str = "internlm",
    ) -> str | None:
        wanted = expand_content(content)
        for uri in uris:
            location = open_location(uri, self.retry)
            error, payload = None, None
            try:
                if is_foreign(location, ckpt_type, layout.MANIFEST):
                    # Weights written by InternLM, Hugging Face or Meta: they hold no optimizer,
                    # sampler or schedule, so asking for those is an error, not a silent skip.
                    if wanted != {"model"}:
                        raise CheckpointError(
                            f"{uri}: a {ckpt_type} checkpoint of another program holds model weights only; "
                            'load it with content=("model",)'
                        )
                    payload = "plain-model"
                    plain_state = read_foreign_model(
                        location, ckpt_type, run.config.model, self.scratch / "files"
                    )
                    check_model_state(run.model, plain_state, uri)
                elif (
                    wanted == {"model"}
                    and not location.exists(layout.MANIFEST)
                    and location.exists(MODEL_CONFIG_FILE)
                ):
                    payload = (
                        "plain-model"  # a weights-only folder (train-kernel import-hf / import-internlm)
                    )
                    folder = local_folder(location, is_model_file, self.scratch / "files")
                    _, plain_state = load_plain_model_state(folder)
                    check_model_state(run.model, plain_state, uri)
                else:
                    payload = read_payload(
                        location, read_manifest(location), wanted, run, self.scratch / "files"
                    )
            except _READ_ERRORS as failure:
                error = str(failure)
            errors = [e for e in world.gather_to_all(error) if e]
            if errors:
                if strict:
                    raise CheckpointError(f"cannot load {uri}: {errors[0]}")
                if self.parallel.rank == 0:
                    log.warning(
                        "checkpoint %s is not usable (%s): falling back to the previous complete one",
                        uri,
                        errors[0],
                    )
                continue
            if payload == "plain-model":
                load_model_state(run.model, plain_state, uri)
                run.optimizer.reset_master_from_model()
            else:
                apply_payload(payload, run, uri)
                for note in payload.notes:
                    if self.parallel.rank == 0:
                        log.info("%s: %s", uri, note)
            shutil.rmtree(self.scratch / "files", ignore_errors=True)
            if self.parallel.rank == 0:
                log.info(
                    "resumed from %s (%s) at step %d",
                    uri,
                    ", ".join(sorted(wanted)),
                    run.counters.batch_count,
                )
            return uri
        raise CheckpointError(
            "auto_resume: every complete checkpoint in "
            f"{self.config.ckpt.save_ckpt_folder} failed its checks (see the warnings above); "
            "refusing to start from scratch over them: move them away or set auto_resume=False"
        )
