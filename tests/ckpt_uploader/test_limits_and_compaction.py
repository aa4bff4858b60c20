"""Bounds that keep a long-lived uploader's memory and journal from growing without end: a busy
reply past the unfinished-job and parked-wait limits, and a journal compacted as jobs finish,
replaying to the same state (jobs held back by --allow-dst included)."""

from __future__ import annotations

import json
import time

import pytest

from ckpt_uploader import jobs as jobs_module
from ckpt_uploader import server as server_module
from ckpt_uploader.allowed import AllowedDestinations
from ckpt_uploader.jobs import JobRunner, TransferOptions
from ckpt_uploader.journal import Journal
from ckpt_uploader.protocol import ProtocolError, job_spec_from_dict
from ckpt_uploader.spool import Spool
from tests.ckpt_uploader.conftest import write_checkpoint


def _runner(tmp_path, journal: Journal, **options) -> JobRunner:
    allowed = AllowedDestinations([f"local:{tmp_path / 'out'}"])
    runner = JobRunner(Spool(tmp_path / "spool"), journal, TransferOptions(workers=1, **options), allowed)
    runner.start()
    return runner


def _spec(tmp_path, job_id: str, dst: str | None = None):
    files = write_checkpoint(tmp_path / "spool", job_id, {"a": 10})
    dst = dst or f"local:{tmp_path / 'out' / job_id}"
    return job_spec_from_dict(
        {"job_id": job_id, "src": job_id, "dst": dst, "files": files, "marker": "1.step"}
    )


def _wait_all(runner: JobRunner, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while any(job["state"] not in ("done", "failed") for job in runner.status()):
        assert time.monotonic() < deadline, runner.status()
        time.sleep(0.01)


def test_submits_past_the_unfinished_job_limit_are_answered_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_UNFINISHED_JOBS", 3)
    runner = _runner(tmp_path, Journal(tmp_path / "journal.jsonl"), part_delay_s=0.5)
    for index in range(3):
        runner.submit(_spec(tmp_path, f"j{index}"))
    with pytest.raises(ProtocolError, match="busy: 3 jobs are not finished"):
        runner.submit(_spec(tmp_path, "j3"))
    assert "j3" not in (tmp_path / "journal.jsonl").read_text()  # refused before the journal
    _wait_all(runner)
    runner.submit(_spec(tmp_path, "j3"))  # room again
    _wait_all(runner)
    assert (tmp_path / "out" / "j3" / "1.step").exists()


def test_waits_past_the_parked_limit_are_answered_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "MAX_PARKED_WAITS", 2)
    runner = _runner(tmp_path, Journal(tmp_path / "journal.jsonl"), part_delay_s=5)
    runner.submit(_spec(tmp_path, "slow"))
    waiters: list = []
    frame = json.dumps({"v": 1, "op": "wait", "job_id": "slow", "timeout": 60}).encode()
    for _ in range(2):
        assert server_module._handle([b"peer", b"", frame], runner, waiters) is None  # parked
    reply = json.loads(server_module._handle([b"peer", b"", frame], runner, waiters))
    assert reply["ok"] is False and "busy: 2 waits are parked" in reply["error"]
    assert len(waiters) == 2


def test_the_journal_is_compacted_as_jobs_finish_and_replays_to_the_same_state(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "KEEP_FINISHED_JOBS", 6)
    path = tmp_path / "journal.jsonl"
    # A job another uploader is allowed (outside this one's --allow-dst): held, never dropped.
    foreign = _spec(tmp_path, "foreign", dst=f"local:{tmp_path / 'elsewhere'}")
    path.write_text(json.dumps({"event": "submit", "job": foreign.to_dict()}) + "\n")
    path.chmod(0o600)
    runner = _runner(tmp_path, Journal(path))
    runner.compact_every = 3
    for index in range(40):
        runner.submit(_spec(tmp_path, f"job{index:02d}"))
    _wait_all(runner)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # 40 jobs x 3 records uncompacted; now at most the kept ones, the held one and the latest few.
    assert len(lines) < 40, len(lines)
    assert lines[0] == {**lines[0], "event": "submit"} and lines[0]["job"]["job_id"] == "foreign"
    assert all((tmp_path / "out" / f"job{index:02d}" / "1.step").exists() for index in range(40))
    assert len(runner.status()) == 6
    replayed = Journal(path).replay()
    assert replayed["foreign"].state == "queued"  # still waiting for an uploader allowed there
    assert [job_id for job_id, job in replayed.items() if job.state == "done"][-1] == "job39"
    assert all(job.state == "done" for job_id, job in replayed.items() if job_id != "foreign")
