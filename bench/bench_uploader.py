"""Checkpoint uploader throughput against boto3's own `upload_file`, to the same moto S3 server.

The same files (default 4 x 256 MiB in /dev/shm, BENCH_UPLOADER_FILES / BENCH_UPLOADER_MB) are
sent alternately by
- boto3: `client.upload_file` file after file, boto3's default TransferConfig (8 MiB parts, 10
  threads) in this process: what a trainer calling boto3 itself would get;
- the uploader: `ckpt-uploader serve` (--workers 4: 4 files and 8 parts in flight, 8 MiB parts) in its own
  process, timed from `submit` to the `wait` reply saying done: journal fsync, sha256 of every byte against
  the manifest, SHA256 part checksums, head_object read-back, the marker, and the spool delete
  included.
The uploader runs twice, with its default SHA256 part checksums and with CRC32 (boto3's own
default, which costs the endpoint less: moto computes the composite checksum in Python).
The order of the three rotates from round to round. Besides wall time, the CPU seconds of the
sender (this process for boto3, the uploader's process) plus moto's are recorded per round.
Each round uploads to a fresh prefix and deletes the objects afterwards (moto keeps them in memory).

Target (checkpoint issue): uploader >= 0.9x boto3. Reported: the ratio of medians and of best rounds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

import boto3
import psutil

from bench.common import save_result
from ckpt_uploader.embedded import start_private_uploader

FILES = int(os.environ.get("BENCH_UPLOADER_FILES", "4"))
FILE_MB = int(os.environ.get("BENCH_UPLOADER_MB", "256"))
ROUNDS = int(os.environ.get("BENCH_UPLOADER_ROUNDS", "5"))
WORKERS = int(os.environ.get("BENCH_UPLOADER_WORKERS", "4"))
PART_MB = int(os.environ.get("BENCH_UPLOADER_PART_MB", "8"))
CHECKSUMS = ("sha256", "crc32")
BUCKET = "bench-uploader"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def make_files(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(FILES):
        data = os.urandom(FILE_MB << 20)
        (folder / f"model_tp{index}.pt").write_bytes(data)
        entries.append(
            {"name": f"model_tp{index}.pt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    return entries


def empty_bucket(client) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])


def main() -> dict:
    moto, endpoint = start_moto()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    work = Path(
        tempfile.mkdtemp(prefix="bench-uploader-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    uploaders: dict = {}
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        source = work / "source"
        files = make_files(source)
        total = sum(f["size"] for f in files)
        uploaders = {}
        for checksum in CHECKSUMS:
            uploaders[checksum] = start_private_uploader(
                work / f"spool-{checksum}",
                allow_dst=[f"boto3:s3://{BUCKET}"],
                journal=work / f"journal-{checksum}.jsonl",
                workers=WORKERS,
                extra_args=("--part-mb", str(PART_MB), "--checksum", checksum),
            )
        clients = {checksum: uploader.client() for checksum, uploader in uploaders.items()}
        moto_process, me = psutil.Process(moto.pid), psutil.Process()

        def run_boto3(round_index: int) -> psutil.Process:
            for entry in files:
                client.upload_file(
                    str(source / entry["name"]), BUCKET, f"boto3/{round_index}/{entry['name']}"
                )
            return me

        def run_uploader(checksum: str, round_index: int) -> psutil.Process:
            job = f"round-{round_index}"
            dst = f"boto3:s3://{BUCKET}/{checksum}/{round_index}"
            clients[checksum].submit(job, job, dst, files, f"{round_index}.step")
            status = clients[checksum].wait(job, timeout_s=600)
            if status["state"] != "done":
                raise RuntimeError(f"uploader job failed: {status}")
            return psutil.Process(uploaders[checksum].process.pid)

        sides = {"boto3": run_boto3, **{f"uploader_{c}": partial(run_uploader, c) for c in CHECKSUMS}}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        cpu_s: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        # Warm-up (not timed): imports, boto3 clients and connections on every side.
        (work / "warm").mkdir()
        (work / "warm" / "w").write_bytes(b"w" * 1024)
        client.upload_file(str(work / "warm" / "w"), BUCKET, "warm/w")
        warm_entry = [{"name": "w", "size": 1024, "sha256": hashlib.sha256(b"w" * 1024).hexdigest()}]
        for checksum in CHECKSUMS:
            shutil.copytree(work / "warm", work / f"spool-{checksum}" / "warm")
            clients[checksum].submit(
                "warm", "warm", f"boto3:s3://{BUCKET}/warm-{checksum}", warm_entry, "0.step"
            )
            clients[checksum].wait("warm", timeout_s=60)
        empty_bucket(client)
        for round_index in range(ROUNDS):
            for checksum in CHECKSUMS:  # the trainer's copy into the spool, not timed
                shutil.copytree(source, work / f"spool-{checksum}" / f"round-{round_index}")
            order = names[round_index % len(names) :] + names[: round_index % len(names)]  # rotate
            for name in order:
                sender = me if name == "boto3" else psutil.Process(uploaders[name.split("_")[1]].process.pid)
                cpu_before = _cpu(sender) + _cpu(moto_process)
                started = time.perf_counter()
                sides[name](round_index)
                seconds[name].append(time.perf_counter() - started)
                cpu_s[name].append(_cpu(sender) + _cpu(moto_process) - cpu_before)
                empty_bucket(client)
            print(
                f"round {round_index}: "
                + ", ".join(f"{k} {v[-1]:.2f} s (cpu {cpu_s[k][-1]:.2f} s)" for k, v in seconds.items()),
                flush=True,
            )
        for uploader_client in clients.values():
            uploader_client.close()
        mib = total / 2**20
        boto3_median = statistics.median(seconds["boto3"])
        result = {
            "files": FILES,
            "file_mib": FILE_MB,
            "workers": WORKERS,
            "part_mib": PART_MB,
            "rounds": ROUNDS,
            "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
            "mib_per_s_median": {k: round(mib / statistics.median(v), 1) for k, v in seconds.items()},
            "over_boto3": {
                k: round(boto3_median / statistics.median(v), 3) for k, v in seconds.items() if k != "boto3"
            },
            # best round of each: the least disturbed by other work on a shared machine
            "over_boto3_best": {
                k: round(min(seconds["boto3"]) / min(v), 3) for k, v in seconds.items() if k != "boto3"
            },
            # CPU seconds of the sender plus moto per round: what a busy shared machine cannot hide
            "cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu_s.items()},
            "cpu_over_boto3": {
                k: round(statistics.median(v) / statistics.median(cpu_s["boto3"]), 3)
                for k, v in cpu_s.items()
                if k != "boto3"
            },
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        }
    finally:
        for uploader in uploaders.values():
            uploader.stop(drain=False)
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)
    save_result("uploader", result)
    return result


if __name__ == "__main__":
    main()
