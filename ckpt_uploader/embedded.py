"""A private uploader for one trainer: started as a child process on a free loopback port, gone
when the trainer is gone (the child polls its parent pid every 50 ms and exits when it has been
re-parented; prctl(PR_SET_PDEATHSIG) is not used: it fires when the *thread* that started the
child exits, and preexec_fn is unsafe in a multi-threaded trainer). Jobs it has acknowledged stay
in its journal, so a trainer restarted on the same spool and journal gets them finished by its next
private uploader."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ckpt_uploader.client import UploaderClient, UploaderError
from ckpt_uploader.server import LISTENING

log = logging.getLogger(__name__)


class PrivateUploader:
    def __init__(self, process: subprocess.Popen, address: str) -> None:
        self.process = process
        self.address = address

    def client(self, timeout_s: float = 10) -> UploaderClient:
        return UploaderClient(self.address, timeout_s=timeout_s)

    def stop(self, drain: bool = True, timeout_s: float = 600) -> bool:
        """With ``drain``, waits (up to ``timeout_s``) until no job is queued or uploading; then
        terminates the process. Returns False when jobs were still unfinished (they stay in the
        journal and resume with the next uploader on it)."""
        drained = True
        if drain and self.process.poll() is None:
            drained = False
            deadline = time.monotonic() + timeout_s
            with self.client(timeout_s=5) as client:
                while time.monotonic() < deadline and self.process.poll() is None:
                    try:
                        jobs = client.status()["jobs"]
                    except UploaderError as error:
                        log.warning("private uploader: %s", error)
                        break
                    if all(job["state"] in ("done", "failed") for job in jobs):
                        drained = True
                        break
                    time.sleep(0.1)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return drained


def start_private_uploader(
    spool: Path,
    allow_dst: Sequence[str],
    journal: Path | None = None,
    workers: int = 4,
    extra_args: tuple[str, ...] = (),
    env: dict | None = None,
    start_timeout_s: float = 30,
) -> PrivateUploader:
    command = [
        sys.executable,
        "-m",
        "ckpt_uploader",
        "serve",
        "--bind",
        "tcp://127.0.0.1:*",  # the server picks a free port and prints it
        "--spool",
        str(spool),
        "--workers",
        str(workers),
        "--parent-pid",
        str(os.getpid()),
        "--stop-wait",  # the trainer does its own bounded wait (uploader.exit_wait_s) before it stops us
        "0",
        *(arg for prefix in allow_dst for arg in ("--allow-dst", prefix)),
        *extra_args,
    ]
    if journal is not None:
        command += ["--journal", str(journal)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    address = _read_address(process, start_timeout_s)
    uploader = PrivateUploader(process, address)
    with uploader.client(timeout_s=start_timeout_s) as client:
        client.ping()
    return uploader


def _read_address(process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode("utf-8", "replace").splitlines():
                if line.startswith(LISTENING):
                    return line[len(LISTENING) :].strip()
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    raise UploaderError(
        f"the private uploader did not start (exit code {process.returncode}); see its log above"
    )
