"""The tests' fork server (tests/zygote.py): a pid that comes back after wrapping around is not
taken for the earlier rank's exit, kill() leaves alone the pid of a rank already reaped, and a
server that dies takes its ranks with it and says so."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import zygote


def _reader_fed(messages: list[dict]) -> zygote.Zygote:
    """A client whose reader has taken `messages` from the server's output (the protocol only)."""
    client = zygote.Zygote.__new__(zygote.Zygote)
    stream = b"".join(json.dumps(message).encode() + b"\n" for message in messages)
    client._process = SimpleNamespace(stdout=io.BytesIO(stream))
    client._lock = threading.Condition()
    client._pids, client._exits, client._dead = {}, {}, False
    client._read()
    return client


def test_a_reused_pid_does_not_inherit_the_earlier_ranks_exit():
    client = _reader_fed([{"id": 0, "pid": 4242}, {"exited": 4242, "code": 0}, {"id": 1, "pid": 4242}])
    assert client._pids == {0: 4242, 1: 4242}
    assert client.exit_code(4242) is None  # the second fork is still running


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_dead_server_takes_its_ranks_along_and_wait_says_so(tmp_path):
    server = zygote.Zygote()
    rank = None
    try:
        sleeper = ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(60)"]
        rank = server.spawn(sleeper, {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "rank.log")
        assert not _gone(rank.pid)
        server._process.kill()
        server._process.wait(10)
        with pytest.raises(RuntimeError, match="fork server died"):
            rank.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(rank.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(rank.pid), "the rank outlived its fork server"
    finally:
        if rank is not None and not _gone(rank.pid):
            os.kill(rank.pid, signal.SIGKILL)
        server.close()


def test_kill_leaves_alone_the_pid_of_a_rank_that_ended(tmp_path):
    """A rank whose exit the server reported was reaped: its pid may belong to another process by
    now (here: a sleep standing in for it), which kill() must not signal."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        client = _reader_fed([{"id": 0, "pid": other.pid}, {"exited": other.pid, "code": 0}])
        ended = zygote.ForkedProcess(client, other.pid, tmp_path / "rank.log")
        ended.kill()
        assert ended.wait(0) == 0
        time.sleep(0.2)
        assert other.poll() is None, "kill() signalled a pid its rank no longer holds"
    finally:
        other.kill()
        other.wait()
