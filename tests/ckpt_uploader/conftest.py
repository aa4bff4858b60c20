"""Helpers for the uploader's tests: checkpoint folders in a spool, and uploader processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_uploader.embedded import PrivateUploader, _read_address, start_private_uploader
from tests.conftest import S3Server


def write_checkpoint(spool: Path, job_id: str, sizes: dict[str, int], seed: int = 0) -> list[dict]:
    """Writes ``<spool>/<job_id>/<name>`` files of the given sizes; returns the manifest entries."""
    entries = []
    for index, (name, size) in enumerate(sizes.items()):
        path = spool / job_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (hashlib.sha256(f"{seed}-{index}".encode()).digest() * (size // 32 + 1))[:size]
        path.write_bytes(data)
        entries.append({"name": name, "size": size, "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def serve(spool: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`ckpt-uploader serve` on a free loopback port, as an operator starts it (a standalone
    service, not a trainer's private one): (process, address). The caller stops it."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckpt_uploader",
            "serve",
            "--bind",
            "tcp://127.0.0.1:*",
            "--spool",
            str(spool),
            *args,
        ],
        stdout=subprocess.PIPE,
    )
    return process, _read_address(process, 20)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def start_uploader(s3_server):
    """Starts uploader processes (as the trainer's embedded mode does) talking to the moto server;
    every one still running is killed at the end of the test."""
    started: list[PrivateUploader] = []

    def start(
        spool: Path,
        journal: Path | None = None,
        *extra_args: str,
        allow_dst: list[str | Path],
        workers: int = 2,
        env: dict | None = None,
    ) -> PrivateUploader:
        """``env``: variables over the moto server's (a fault proxy's endpoint, say)."""
        uploader = start_private_uploader(
            spool,
            allow_dst=[str(prefix) for prefix in allow_dst],
            journal=journal,
            workers=workers,
            extra_args=extra_args,
            env={**os.environ, **s3_server.env, **(env or {})},
        )
        started.append(uploader)
        return uploader

    yield start
    for uploader in started:
        if uploader.process.poll() is None:
            uploader.process.kill()
            uploader.process.wait()


@pytest.fixture
def s3_store_env(s3_server, monkeypatch):
    """This process's boto3 talks to the moto server (for stores opened in the test itself)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    return s3_server


@pytest.fixture(scope="session")
def s3_server_with_auth():
    """moto with request signatures checked (INITIAL_NO_AUTH_ACTION_COUNT=0): the "testing" keys
    and any other unknown key are refused, as a real endpoint refuses wrong credentials."""
    server = S3Server(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    server.stop()
