"""The uploader as a service: real process, real ZeroMQ socket, real moto server."""

from __future__ import annotations

import json
import os
import time

import pytest
import zmq

from ckpt_uploader.client import UploaderClient, UploaderError
from ckpt_uploader.embedded import start_private_uploader
from ckpt_uploader.stores import open_store
from tests.ckpt_uploader.conftest import sha256_of, write_checkpoint
from tests.conftest import free_port, run_cli

# A port nothing listens on, for the unreachable-endpoint test (fixed here: --allow-dst names it).
UNREACHABLE_PORT = free_port()
BUCKETS = (
    "svc-s3",
    "no-such-bucket",
    "svc-retry",
    *(f"svc-damage-{damage}" for damage in ("missing", "short", "changed")),
)


@pytest.fixture(scope="module")
def service(s3_server, s3_server_with_auth, tmp_path_factory):
    """One uploader shared by this module's tests (each test uses its own job ids and buckets),
    allowed to write to the tests' temporary folders and their buckets."""
    spool = tmp_path_factory.mktemp("spool")
    auth_port = s3_server_with_auth.endpoint_url.rsplit(":", 1)[1]
    allowed = [
        f"local:{tmp_path_factory.getbasetemp()}",
        *(f"boto3:s3://{bucket}" for bucket in BUCKETS),
        f"boto3:s3://ckpts.127.0.0.1:{auth_port}/run",
        f"boto3:s3://ckpts.127.0.0.1:{UNREACHABLE_PORT}/run",
    ]
    uploader = start_private_uploader(
        spool,
        allow_dst=allowed,
        workers=3,
        extra_args=("--part-mb", "5"),
        env={**os.environ, **s3_server.env},
    )
    client = UploaderClient(uploader.address, timeout_s=10)
    yield spool, client, uploader
    client.close()
    uploader.stop(drain=False)


def _store(uri: str):
    """A store opened in the test itself; needs the s3_store_env fixture (AWS_* set for this test)."""
    return open_store(uri)


def test_upload_to_s3_then_marker_and_spool_freed(service, s3_server, s3_store_env):
    spool, client, _ = service
    s3_server.make_bucket("svc-s3")
    files = write_checkpoint(
        spool, "step-100", {"model_tp0_pp0.pt": 11 << 20, "optimizer/zero0.pt": 3000, "context": 0}
    )
    dst = "boto3:s3://svc-s3/run1/100"
    client.submit("step-100", "step-100", dst, files, "100.step")
    client.submit("step-100", "step-100", dst, files, "100.step")  # the same job again: no effect
    status = client.wait("step-100", timeout_s=30)
    assert status["state"] == "done" and status["bytes_done"] == status["bytes_total"] == (11 << 20) + 3000, (
        status
    )
    store = _store(dst)
    assert store.list_keys() == ["100.step", "context", "model_tp0_pp0.pt", "optimizer/zero0.pt"]
    for entry in files:
        assert sha256_of(store.get_bytes(entry["name"])) == entry["sha256"]
    assert json.loads(store.get_bytes("100.step"))["job_id"] == "step-100"
    assert not (spool / "step-100").exists()
    assert [job["job_id"] for job in client.status()["jobs"]].count("step-100") == 1


def test_upload_to_local_folder_replaces_stale_marker(service, tmp_path):
    spool, client, _ = service
    dst = tmp_path / "ckpts" / "snapshot" / "0"
    dst.mkdir(parents=True)
    (dst / "50.step").write_text("{}")  # the previous step's marker in a reused snapshot folder
    files = write_checkpoint(spool, "snap-0", {"model.pt": 2 << 20, "sampler": 10})
    client.submit("snap-0", "snap-0", f"local:{dst}", files, "150.step")
    assert client.wait("snap-0", timeout_s=30)["state"] == "done"
    assert sorted(p.name for p in dst.iterdir()) == ["150.step", "model.pt", "sampler"]
    for entry in files:
        assert sha256_of((dst / entry["name"]).read_bytes()) == entry["sha256"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"src": "../outside"}, "'..'"),
        ({"src": "/etc"}, "relative path"),
        ({"src": "link-out"}, "outside the spool"),
        ({"files": [{"name": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}, "'..'"),
        ({"files": [{"name": "/etc/passwd", "size": 1, "sha256": "0" * 64}]}, "relative path"),
        ({"files": [{"name": "escape", "size": 1, "sha256": "0" * 64}]}, "outside the spool"),
        ({"files": [{"name": "a", "size": -1, "sha256": "0" * 64}]}, "size"),
        ({"files": []}, "files"),
        ({"marker": "../1.step"}, "marker"),
        ({"dst": "gs://nowhere/x"}, "unknown scheme"),
        ({"job_id": "bad id/with slash"}, "job_id"),
    ],
)
def test_paths_outside_the_spool_and_bad_fields_are_refused(service, tmp_path, change, message):
    spool, client, _ = service
    (spool / "trav").mkdir(exist_ok=True)
    if not (spool / "trav" / "escape").is_symlink():
        (tmp_path / "secret").write_text("x")
        (spool / "trav" / "escape").symlink_to(tmp_path / "secret")
    if not (spool / "link-out").is_symlink():
        (spool / "link-out").symlink_to(tmp_path)
    request = {
        "job_id": "trav",
        "src": "trav",
        "dst": f"local:{tmp_path}/d",
        "marker": "1.step",
        "files": [{"name": "a", "size": 1, "sha256": "0" * 64}],
        **change,
    }
    with pytest.raises(UploaderError, match=message):
        client.submit(**request)
    client.ping()  # still up


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"\xff\xfe not json", "malformed request"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"v": 1, "op": "explode"}', "unknown op"),
        (b'{"v": 99, "op": "ping"}', "unsupported protocol version"),
        (b'{"op": "ping"}', "unsupported protocol version"),
        (b'{"v": 1, "op": "submit", "job_id": "x"}', "missing field 'src'"),
        (b'{"v": 1, "op": "status", "job_id": "never-submitted"}', "unknown job_id"),
        (b'{"v": 1, "op": "wait", "job_id": "never-submitted", "timeout": 1}', "unknown job_id"),
    ],
)
def test_garbage_gets_an_error_reply_and_the_service_stays_up(service, frame, message):
    _, client, uploader = service
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.linger = 0
    socket.connect(uploader.address)
    socket.send(frame)
    assert socket.poll(5000), "no reply"
    reply = json.loads(socket.recv())
    socket.close()
    assert reply["ok"] is False and message in reply["error"], reply
    client.ping()


def test_multi_frame_garbage_from_a_dealer(service):
    _, client, uploader = service
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(uploader.address)
    socket.send_multipart([b"", b"one", b"two"])
    assert socket.poll(5000)
    reply = json.loads(socket.recv_multipart()[-1])
    socket.close()
    assert reply["ok"] is False and "one frame" in reply["error"]
    client.ping()


def test_missing_bucket_fails_the_job_clearly(service, s3_server):
    spool, client, _ = service
    files = write_checkpoint(spool, "nobucket", {"model.pt": 100})
    client.submit("nobucket", "nobucket", "boto3:s3://no-such-bucket/run/1", files, "1.step")
    status = client.wait("nobucket", timeout_s=30)
    assert status["state"] == "failed" and "bucket 'no-such-bucket' does not exist" in status["error"]
    assert (spool / "nobucket" / "model.pt").exists()  # kept for a retry


def test_wrong_credentials_fail_the_job_clearly(service, s3_server_with_auth):
    spool, client, _ = service
    files = write_checkpoint(spool, "badcreds", {"model.pt": 100})
    port = s3_server_with_auth.endpoint_url.rsplit(":", 1)[1]
    client.submit("badcreds", "badcreds", f"boto3:s3://ckpts.127.0.0.1:{port}/run/1", files, "1.step")
    status = client.wait("badcreds", timeout_s=30)
    assert (
        status["state"] == "failed"
        and "access denied" in status["error"]
        and "check the credentials" in status["error"]
    )


def test_an_unreachable_endpoint_is_an_outage_retried_until_the_deadline(start_uploader, tmp_path):
    spool = tmp_path / "spool"
    files = write_checkpoint(spool, "noendpoint", {"model.pt": 100})
    dst = f"boto3:s3://ckpts.127.0.0.1:{UNREACHABLE_PORT}/run/1"
    uploader = start_uploader(
        spool,
        None,
        "--outage-deadline",
        "4s",
        "--outage-pause",
        "0.2,0.5",
        "--retry-attempts",
        "2",
        allow_dst=[dst],
    )
    with uploader.client() as client:
        client.submit("noendpoint", "noendpoint", dst, files, "1.step")
        deadline = time.monotonic() + 10
        while (status := client.status("noendpoint"))["state"] != "retrying" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status["state"] == "retrying" and "cannot reach the S3 endpoint" in status["error"], status
        assert status["retry_until"] > time.time() and status["attempts"] >= 1
        listed = run_cli("ckpt_uploader", "status", "--address", uploader.address).stdout
        assert "noendpoint\tretrying" in listed and "retried until" in listed, listed
        status = client.wait("noendpoint", timeout_s=30)
    assert status["state"] == "failed" and "gave up after an outage of 4 s" in status["error"], status
    assert status["attempts"] >= 3
    assert (spool / "noendpoint" / "model.pt").exists()  # kept for a retry


@pytest.mark.parametrize("damage", ["missing", "short", "changed"])
def test_spool_file_missing_or_short_never_gets_a_marker(service, s3_server, s3_store_env, damage):
    spool, client, _ = service
    bucket = s3_server.make_bucket(f"svc-damage-{damage}")
    job = f"damaged-{damage}"
    files = write_checkpoint(spool, job, {"model.pt": 6 << 20, "sampler": 100})
    path = spool / job / "model.pt"
    if damage == "missing":
        path.unlink()
    elif damage == "short":
        path.write_bytes(path.read_bytes()[:-1])
    else:  # same size, other bytes: only the sha256 check catches it
        path.write_bytes(b"\0" * (6 << 20))
    dst = f"boto3:s3://{bucket}/run/1"
    client.submit(job, job, dst, files, "1.step")
    status = client.wait(job, timeout_s=30)
    assert status["state"] == "failed", status
    expected = {"missing": "missing", "short": "manifest says", "changed": "sha256"}[damage]
    assert expected in status["error"]
    store = _store(dst)
    assert "1.step" not in store.list_keys() and store.size("model.pt") is None


def test_failed_job_is_retried_when_submitted_again(service, s3_server):
    spool, client, _ = service
    files = write_checkpoint(spool, "retry", {"model.pt": 1000})
    dst = "boto3:s3://svc-retry/run/5"
    client.submit("retry", "retry", dst, files, "5.step")
    assert client.wait("retry", timeout_s=30)["state"] == "failed"  # no bucket yet
    s3_server.make_bucket("svc-retry")
    client.submit("retry", "retry", dst, files, "5.step")
    assert client.wait("retry", timeout_s=30)["state"] == "done"
    with pytest.raises(UploaderError, match="different"):
        client.submit("retry", "retry", dst, files, "6.step")


def test_client_times_out_instead_of_hanging(tmp_path):
    client = UploaderClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)
    with pytest.raises(UploaderError, match="no reply"):
        client.ping()
    with pytest.raises(UploaderError, match="no reply"):  # the REQ socket was reset: it can send again
        client.status()
    client.close()


def test_status_cli_lists_jobs(service, tmp_path):
    spool, client, uploader = service

    files = write_checkpoint(spool, "cli-listed", {"a": 10})
    client.submit("cli-listed", "cli-listed", f"local:{tmp_path / 'out'}", files, "1.step")
    client.wait("cli-listed", timeout_s=30)
    result = run_cli("ckpt_uploader", "status", "--address", uploader.address)
    assert "cli-listed\tdone\t0.0/0.0 MiB" in result.stdout, result.stdout


def test_wait_times_out_on_a_slow_job(s3_server, start_uploader, tmp_path):
    spool = tmp_path / "spool"
    files = write_checkpoint(spool, "slow", {"a": 10, "b": 10})
    uploader = start_uploader(spool, None, "--part-delay", "0.6", workers=1, allow_dst=[tmp_path / "out"])
    with uploader.client() as client:
        client.submit("slow", "slow", f"local:{tmp_path / 'out'}", files, "1.step")
        first = client.wait("slow", timeout_s=0.2)
        assert first["timed_out"] and first["state"] in ("queued", "uploading")
        assert uploader.stop(drain=True, timeout_s=20)  # drain: the job finishes before the stop
    assert (tmp_path / "out" / "1.step").exists()
    assert uploader.process.returncode is not None


def _hostile_frames() -> list[bytes]:
    """Frames a broken or hostile peer may send: nesting past the parser's recursion limit, a frame
    over the size limit, binary noise, wrong types in every field, and seeded random mutations
    (bytes flipped, cut, repeated) of a valid submit."""
    import random

    valid = json.dumps(
        {
            "v": 1,
            "op": "submit",
            "job_id": "j1",
            "src": "j1",
            "dst": "local:/tmp/x",
            "marker": "1.step",
            "files": [{"name": "a", "size": 1, "sha256": "0" * 64}],
        }
    ).encode()
    frames = [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"v": 1, "op": "status", "job_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"x" * (17 * 2**20),
        bytes(range(256)) * 64,
        b'{"v": 1, "op": "submit", "job_id": 7, "src": [], "dst": {}, "marker": null, "files": {}}',
        b'{"v": 1, "op": "submit", "job_id": "j", "src": "j", "dst": "local:/x", "marker": "1.step", '
        b'"files": [{"name": "a", "size": "1", "sha256": 5}]}',
        b'{"v": 1, "op": "wait", "job_id": "j", "timeout": "soon"}',
        b'{"v": 1, "op": "wait", "job_id": ["j"], "timeout": [1]}',
        b'{"v": 1.0e999, "op": "ping"}',
        b'{"v": 1, "op": {"nested": true}}',
    ]
    rng = random.Random(12)
    for _ in range(150):
        frame = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            kind, at = rng.random(), rng.randrange(len(frame))
            if kind < 0.5:
                frame[at] = rng.randrange(256)
            elif kind < 0.8:
                del frame[at : at + rng.randint(1, 20)]
            else:
                frame[at:at] = frame[at : at + rng.randint(1, 40)] * rng.randint(1, 5)
        frames.append(bytes(frame))
    return frames


def test_hostile_and_mutated_frames_get_replies_and_the_service_stays_up(service):
    _, client, uploader = service
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.linger = 0
    socket.connect(uploader.address)
    refused = 0
    for index, frame in enumerate(_hostile_frames()):
        socket.send(frame)
        assert socket.poll(10_000), f"frame {index} ({frame[:60]!r}...) got no reply"
        reply = json.loads(socket.recv())
        assert isinstance(reply.get("ok"), bool), (index, reply)
        refused += reply["ok"] is False
        if index < 4:  # the first ones are named in the reply
            assert reply["ok"] is False and len(reply["error"]) <= 2003, (index, reply)
            assert ("nested too deeply" in reply["error"]) or index >= 2, reply
        if index == 2:
            assert "request too large" in reply["error"]
    socket.close()
    assert refused >= 150
    client.ping()
    assert uploader.process.poll() is None
