"""Fixtures shared by every package's tests: real tokenizer files trained on the spot (no
downloads) and a runner for the project's console scripts as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import train_kernel  # noqa: F401 - before any test imports torch: MKL's reproducible mode (its __init__)
from tests import zygote

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Packed rows keep documents apart with cu_seqlens.",
    "训练大模型需要大量的文本数据。",
    "Checkpoints are uploaded to S3 while training goes on.",
] * 40


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python -m <package>.cli ...` as its own process, as a user's shell would."""
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            handle.write("\n")
    return path


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_TEXTS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tok"),
        vocab_size=120,
        model_type="bpe",
        pad_id=0,
        unk_id=3,
        bos_id=1,
        eos_id=2,
        character_coverage=1.0,
        minloglevel=2,
    )
    return folder / "tok.model"


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXTS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


class MlflowServer:
    """A real `mlflow server` (one uvicorn worker, SQLite store) on a free loopback port, as a
    process group of its own; `restart()` kills it and starts it again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        import socket

        self.folder = folder
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        import os
        import time
        import urllib.request

        args = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--uvicorn-opts",
            "--timeout-graceful-shutdown 1",
        ]
        # No job-execution workers (huey consumers for MLflow's GenAI jobs): three more processes
        # importing mlflow at every (re)start, and nothing here submits jobs.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited ({self.process.returncode}); see {self.folder / 'server.log'}"
                )
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout_s} s")

    def stop(self) -> None:
        import os
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)  # as a crash would: no goodbye to clients
        self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow tracking server for the whole session (start-up takes seconds): `.uri`,
    `.restart()`, `.stop()`, `.start()`. Tests that stop it start it again before they end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


# ---- S3: a real moto server (HTTP on a free loopback port), for the uploader and the trainer ----


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server in its own process. Nothing is set globally: pass ``.env`` to the
    processes (or ``open_store``/boto3 clients) that should talk to it."""

    def __init__(self, extra_env: dict | None = None) -> None:
        import os
        import time
        import urllib.request

        port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(extra_env or {})},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server: ``.endpoint_url``, ``.env`` (AWS_* for it) and ``.make_bucket(name)``."""
    server = S3Server()
    yield server
    server.stop()


class FaultProxy:
    """tests/fault_proxy.py in its own process in front of an S3 server: ``.url`` is the endpoint
    to give boto3 (``.env`` holds the AWS_* variables for it), ``.set(**settings)`` changes what it
    fails (see that module), ``.stats()`` counts what it forwarded and failed."""

    def __init__(self, target: S3Server, folder: Path) -> None:
        self.control = folder / "faults.json"
        self.set()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fault_proxy",
                "--target",
                target.endpoint_url,
                "--control",
                str(self.control),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the fault proxy did not start: {line!r}")
        self.url = line.split()[-1]
        self.env = {**target.env, "AWS_ENDPOINT_URL": self.url}

    def set(self, **settings) -> None:
        """Replaces the settings at once (written aside, then renamed over the old file)."""
        temp = self.control.with_suffix(".tmp")
        temp.write_text(json.dumps(settings))
        temp.replace(self.control)

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/__proxy__/stats", timeout=5) as response:
            return json.loads(response.read())

    def failed(self, op: str) -> int:
        return sum(self.stats()["failed"].get(op, {}).values())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def fault_proxy(s3_server, tmp_path):
    """A fault-injecting proxy in front of the moto server (forwarding everything until told)."""
    proxy = FaultProxy(s3_server, tmp_path)
    yield proxy
    proxy.stop()


# ---- markers: `make test-fast` leaves out the tests marked server, distributed or process ----

# Fixtures that start a server process (a test's fixturenames include the fixtures its fixtures use).
SERVER_FIXTURES = frozenset({"mlflow_server", "s3_server", "s3_server_with_auth"})
KINDS = ("server", "distributed", "process")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


# Programs whose start makes a test a `process` test (at least); helper tools that libraries call
# (git for a commit id, ldconfig behind ctypes.util.find_library) do not count.
PROJECT_PROGRAMS = frozenset(
    {
        "tokenize-stage",
        "pack-stage",
        "train-kernel",
        "metrics-sidecar",
        "ckpt-uploader",
        "torchrun",
        "mlflow",
        "make",
    }
)


def started_kind(args, env: dict | None) -> str | None:
    """What a command line starts: "server", "distributed" (a rank of a multi-process job),
    "process" (Python or one of the project's programs), or None (a helper tool)."""
    import shlex

    words = [str(word) for word in args] if isinstance(args, (list, tuple)) else shlex.split(str(args))
    program = Path(words[0]).name if words else ""
    if not (program.startswith("python") or program in PROJECT_PROGRAMS):
        return None
    text = " ".join(words)
    if "moto.server" in text or ("mlflow" in text and "server" in words):
        return "server"
    if ("ckpt_uploader" in text or "ckpt-uploader" in text) and "serve" in words:
        return "server"
    world_size = (env or {}).get("WORLD_SIZE", "")
    if world_size.isdigit() and int(world_size) > 1:
        return "distributed"
    return "process"


# The test being run (setup, call and teardown), or None between tests.
_running: list[pytest.Item | None] = [None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        yield
    finally:
        _running[0] = None


def pytest_configure(config) -> None:
    """Keeps the markers true: a test that starts a server, a multi-rank job or any other process
    without the marker that says so fails, naming the marker, instead of slowing `make test-fast`
    unnoticed. Checked for the whole session, not per test function: a session-scoped fixture
    starts its server during the setup of the first test that asks for it, before any function
    fixture could watch. A server or distributed test may also start plain processes."""
    original = subprocess.Popen.__init__

    def check_start(args, env: dict | None) -> None:
        item, kind = _running[0], started_kind(args, env)
        allowed = {kind} if kind != "process" else set(KINDS)
        if (
            item is not None
            and kind is not None
            and not any(item.get_closest_marker(name) for name in allowed)
        ):
            raise AssertionError(
                f"{item.nodeid} starts {args!r:.120}: mark it @pytest.mark.{kind} "
                "(`make test-fast` leaves those out)"
            )

    def checked(self, args=None, *more, **options):
        if args is None:
            args = options.pop("args")
        check_start(args, options.get("env"))
        original(self, args, *more, **options)

    subprocess.Popen.__init__ = checked
    zygote.START_CHECKS.append(check_start)  # ranks forked by the tests' fork server
    config.add_cleanup(lambda: setattr(subprocess.Popen, "__init__", original))
