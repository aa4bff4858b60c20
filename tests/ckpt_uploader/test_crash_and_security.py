"""Crash recovery (SIGKILL in the middle of a multipart upload), CURVE, and the embedded mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ckpt_uploader.client import UploaderClient, UploaderError
from ckpt_uploader.stores import open_store
from tests.ckpt_uploader.conftest import serve, sha256_of, write_checkpoint
from tests.conftest import run_cli


def test_sigkill_mid_multipart_then_restart_finishes_the_job(
    s3_server, s3_store_env, start_uploader, tmp_path
):
    bucket = s3_server.make_bucket("crash")
    spool, journal = tmp_path / "spool", tmp_path / "state" / "journal.jsonl"
    # 2 files x 3 parts of 5 MiB, one file at a time, 2 parts in flight, 0.4 s each: ~1.2 s to interrupt
    files = write_checkpoint(spool, "step-200", {"model_a.pt": 15 << 20, "model_b.pt": 15 << 20})
    dst = f"boto3:s3://{bucket}/run/200"
    first = start_uploader(
        spool, journal, "--part-mb", "5", "--part-delay", "0.4", workers=1, allow_dst=[f"boto3:s3://{bucket}"]
    )
    with first.client() as client:
        client.submit("step-200", "step-200", dst, files, "200.step")
        deadline = time.monotonic() + 20
        while client.status("step-200")["bytes_done"] < (5 << 20):  # at least one part sent
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.status("step-200")["state"] == "uploading"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()

    store = open_store(dst)
    assert "200.step" not in store.list_keys()  # no marker for a half-uploaded checkpoint
    assert s3_server.client().list_multipart_uploads(Bucket=bucket)["Uploads"]  # killed mid-multipart

    second = start_uploader(spool, journal, "--part-mb", "5", workers=2, allow_dst=[f"boto3:s3://{bucket}"])
    with second.client() as client:
        status = client.wait("step-200", timeout_s=30)  # resumed from the journal, not resubmitted
    assert status["state"] == "done", status
    assert store.list_keys() == ["200.step", "model_a.pt", "model_b.pt"]
    for entry in files:
        assert sha256_of(store.get_bytes(entry["name"])) == entry["sha256"]
    assert not (spool / "step-200").exists()
    assert "Uploads" not in s3_server.client().list_multipart_uploads(
        Bucket=bucket
    )  # the killed one's were aborted


def test_journal_with_a_torn_last_line_still_resumes(start_uploader, tmp_path):
    spool, journal = tmp_path / "spool", tmp_path / "journal.jsonl"
    files = write_checkpoint(spool, "j1", {"a": 100})
    first = start_uploader(spool, journal, "--part-delay", "30", workers=1, allow_dst=[tmp_path / "out"])
    with first.client() as client:
        client.submit("j1", "j1", f"local:{tmp_path / 'out'}", files, "1.step")
    first.process.kill()
    first.process.wait()
    with open(journal, "ab") as handle:
        handle.write(b'{"event": "submit", "job": {"job_id": "torn"')  # a crash mid-append
    second = start_uploader(spool, journal, allow_dst=[tmp_path / "out"])
    with second.client() as client:
        assert client.wait("j1", timeout_s=20)["state"] == "done"
    assert (tmp_path / "out" / "1.step").exists()


@pytest.mark.server
def test_curve_needs_the_server_key_and_an_authorized_client(tmp_path):
    keys = tmp_path / "keys"
    run_cli("ckpt_uploader", "keygen", str(keys))
    spool = tmp_path / "spool"
    process, address = serve(spool, "--curve-keys", str(keys), "--allow-dst", str(tmp_path / "out"))
    try:
        with UploaderClient(
            address,
            timeout_s=5,
            curve_server_key=keys / "server.key",
            curve_client_key=keys / "client.key_secret",
        ) as client:
            client.ping()
            assert client.status() == {"jobs": []}
        plain = UploaderClient(address, timeout_s=0.5)  # no CURVE: the handshake never completes
        with pytest.raises(UploaderError, match="no reply"):
            plain.ping()
        plain.close()
        # the right server key, but a client key that is not in authorized/
        stranger = UploaderClient(address, timeout_s=0.5, curve_server_key=keys / "server.key")
        with pytest.raises(UploaderError, match="no reply"):
            stranger.ping()
        stranger.close()
    finally:
        process.kill()
        process.wait()


@pytest.mark.server
def test_refuses_a_public_bind_without_curve(tmp_path):
    result = run_cli(
        "ckpt_uploader",
        "serve",
        "--bind",
        "tcp://0.0.0.0:5999",
        "--spool",
        str(tmp_path),
        "--allow-dst",
        str(tmp_path / "out"),
        check=False,
    )
    assert result.returncode != 0 and "--curve-keys" in result.stderr


@pytest.mark.process
def test_private_uploader_dies_with_its_parent(tmp_path):
    script = (
        "import sys, time; from pathlib import Path\n"
        "from ckpt_uploader.embedded import start_private_uploader\n"
        f"u = start_private_uploader(Path({str(tmp_path / 'spool')!r}), allow_dst=[{str(tmp_path)!r}])\n"
        "print(u.process.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        # a zombie is gone too: it is no longer running
        try:
            with open(f"/proc/{child_pid}/stat") as stat:
                if stat.read().split(")")[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the private uploader outlived its parent")


def test_a_corrupt_journal_line_is_named(tmp_path):
    from ckpt_uploader.journal import Journal, JournalError

    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "done", "job_id": "x"}\nnot json\n{"event": "done"}\n')
    with pytest.raises(JournalError, match=r"journal.jsonl:1: "):  # done for a job never submitted
        Journal(path).replay()
    path.write_text('{"event": "bogus"}\n')
    with pytest.raises(JournalError, match=r"journal.jsonl:1: .*move the file away"):
        Journal(path).replay()


@pytest.mark.server
@pytest.mark.parametrize("problem", ["world-writable", "another-user", "journal-of-another-user"])
def test_a_spool_or_journal_someone_else_can_write_is_refused(tmp_path, problem):
    """Whoever can write the spool or the journal decides what is uploaded where: the service
    refuses to start on one it does not own alone, naming the path and the fix."""
    spool, journal = tmp_path / "spool", tmp_path / "state" / "journal.jsonl"
    spool.mkdir()
    if problem == "world-writable":
        spool.chmod(0o777)
    elif problem == "another-user":
        os.chown(spool, 65534, 65534)  # nobody (the tests run as root)
    else:
        journal.parent.mkdir()
        journal.write_text("")
        os.chown(journal, 65534, 65534)
    result = run_cli(
        "ckpt_uploader",
        "serve",
        "--spool",
        str(spool),
        "--journal",
        str(journal),
        "--allow-dst",
        str(tmp_path / "out"),
        "--bind",
        "tcp://127.0.0.1:0",
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    named = journal if problem == "journal-of-another-user" else spool
    assert str(named) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert ("chmod go-w" if problem == "world-writable" else "belongs to user id 65534") in result.stderr


def test_a_new_spool_and_journal_are_private(tmp_path):
    from ckpt_uploader.journal import Journal
    from ckpt_uploader.spool import Spool

    Spool(tmp_path / "a" / "spool")
    journal = Journal(tmp_path / "b" / "journal.jsonl")
    journal.append({"event": "done", "job_id": "x"})
    journal.close()
    assert (tmp_path / "a" / "spool").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "b" / "journal.jsonl").stat().st_mode & 0o777 == 0o600


@pytest.mark.server
def test_sigterm_lets_jobs_in_flight_finish_within_the_stop_wait_then_reports_the_rest(
    s3_server, start_uploader, tmp_path, capfd
):
    spool, journal, out = tmp_path / "spool", tmp_path / "journal.jsonl", tmp_path / "out"
    quick = write_checkpoint(spool, "quick", {"a": 10, "b": 10})
    slow = write_checkpoint(spool, "slow", {name: 10 for name in "abcdef"})
    uploader = start_uploader(
        spool, journal, "--part-delay", "1", "--stop-wait", "4s", workers=1, allow_dst=[out]
    )
    with uploader.client() as client:
        client.submit("quick", "quick", f"local:{out / 'quick'}", quick, "1.step")
        client.submit("slow", "slow", f"local:{out / 'slow'}", slow, "2.step")
        uploader.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(UploaderError, match="stopping"):
            client.submit("late", "quick", f"local:{out / 'late'}", quick, "3.step")
    started = time.monotonic()
    assert uploader.process.wait(timeout=30) == 0
    assert 3 < time.monotonic() - started < 15
    assert (out / "quick" / "1.step").exists()  # finished during the stop wait
    assert not (out / "slow" / "2.step").exists()
    err = capfd.readouterr().err
    assert "1 job(s) unfinished" in err and "slow -> local:" in err, err
    again = start_uploader(spool, journal, allow_dst=[out])
    with again.client() as client:
        assert client.wait("slow", timeout_s=30)["state"] == "done"
    assert (out / "slow" / "2.step").exists()
