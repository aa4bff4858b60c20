"""S3 faults between the uploader and the store, injected by a real HTTP proxy in front of moto's
server (tests/fault_proxy.py): 5xx, SlowDown, throttling and reset connections on every kind of
call, HEAD and LIST included, are survived by botocore's retries; an outage keeps the job retrying
(reported in `status`) until the store is back, and the marker still comes last."""

from __future__ import annotations

import json
import time

from tests.ckpt_uploader.conftest import sha256_of, write_checkpoint
from tests.conftest import run_cli

EVERY_KIND = ["503", "slowdown", "500", "throttle", "drop"]
ALL_OPS = [
    "head_bucket",
    "head_object",
    "list",
    "list_uploads",
    "put",
    "put_part",
    "create_multipart",
    "complete",
]


def _start(start_uploader, fault_proxy, spool, dst, *args):
    return start_uploader(spool, None, "--part-mb", "5", *args, allow_dst=[dst], env=fault_proxy.env)


def test_calls_of_every_kind_failing_twice_in_a_row_still_upload_whole(
    s3_server, fault_proxy, start_uploader, tmp_path
):
    bucket = s3_server.make_bucket("faults-every-other")
    dst = f"boto3:s3://{bucket}/run/8"
    spool = tmp_path / "spool"
    files = write_checkpoint(spool, "step-8", {"model.pt": 12 << 20, "optimizer.pt": 300_000, "context": 10})
    # A stale marker from a reused folder: removed (a LIST and a DELETE) before the first file.
    s3_server.client().put_object(Bucket=bucket, Key="run/8/4.step", Body=b"{}")
    # Two failures in a row, then two successes, on every operation: one retry is not enough.
    fault_proxy.set(every=4, burst=2, faults=EVERY_KIND, ops=ALL_OPS + ["delete"])
    uploader = _start(start_uploader, fault_proxy, spool, dst)
    with uploader.client() as client:
        client.submit("step-8", "step-8", dst, files, "8.step")
        status = client.wait("step-8", timeout_s=120)
    assert status["state"] == "done" and status["attempts"] == 1, status  # botocore's retries sufficed
    failed = fault_proxy.stats()["failed"]
    for op in (
        "head_bucket",
        "head_object",
        "list",
        "put",
        "put_part",
        "create_multipart",
        "complete",
        "delete",
    ):
        assert op in failed, (op, failed)
    kinds = {kind for per_op in failed.values() for kind in per_op}
    assert kinds == set(EVERY_KIND), kinds
    s3 = s3_server.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/8/")["Contents"])
    assert keys == ["run/8/8.step", "run/8/context", "run/8/model.pt", "run/8/optimizer.pt"]
    for entry in files:
        body = s3.get_object(Bucket=bucket, Key=f"run/8/{entry['name']}")["Body"].read()
        assert sha256_of(body) == entry["sha256"]
    marker_time = s3.head_object(Bucket=bucket, Key="run/8/8.step")["LastModified"]
    for entry in files:
        assert s3.head_object(Bucket=bucket, Key=f"run/8/{entry['name']}")["LastModified"] <= marker_time
    assert json.loads(s3.get_object(Bucket=bucket, Key="run/8/8.step")["Body"].read())["job_id"] == "step-8"


def test_an_outage_keeps_the_job_retrying_until_the_store_is_back(
    s3_server, fault_proxy, start_uploader, tmp_path
):
    bucket = s3_server.make_bucket("faults-outage")
    dst = f"boto3:s3://{bucket}/run/3"
    spool = tmp_path / "spool"
    files = write_checkpoint(spool, "step-3", {"model.pt": 6 << 20, "sampler": 100})
    fault_proxy.set(outage=True)
    uploader = _start(
        start_uploader, fault_proxy, spool, dst, "--retry-attempts", "2", "--outage-pause", "0.2,0.5"
    )
    with uploader.client() as client:
        client.submit("step-3", "step-3", dst, files, "3.step")
        deadline = time.monotonic() + 30
        while (status := client.status("step-3"))["attempts"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status["state"] in ("retrying", "uploading") and status["attempts"] >= 3, status
        assert "503" in (status["error"] or client.status("step-3")["error"] or "")
        listed = run_cli("ckpt_uploader", "status", "--address", uploader.address).stdout
        assert "step-3\t" in listed and ("retrying" in listed or "uploading" in listed), listed
        assert not _keys(s3_server, bucket, "run/3/")
        assert (spool / "step-3" / "model.pt").exists()
        fault_proxy.set()  # the store is back
        status = client.wait("step-3", timeout_s=60)
    assert status["state"] == "done" and status["error"] is None, status
    assert _keys(s3_server, bucket, "run/3/") == ["3.step", "model.pt", "sampler"]
    assert not (spool / "step-3").exists()
    multipart = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert multipart == []  # the interrupted attempts' uploads were aborted


def _keys(server, bucket: str, prefix: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix) :] for item in listing.get("Contents", []))
